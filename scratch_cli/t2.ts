import { Effect, Schema, SchemaAST } from "effect";
const steps = Schema.Int.check(Schema.isGreaterThanOrEqualTo(1)).annotate({ description: "Steps", default: 10 });
const lit = Schema.Literals(["lora", "full"]).annotate({ description: "Mode", default: "lora" });
const nul = Schema.NullOr(Schema.String).annotate({ description: "URL", default: null });
const arr = Schema.Array(Schema.Finite).annotate({ description: "weights", default: [1] });
const arrLit = Schema.Array(Schema.Literals(["q_proj", "v_proj"])).annotate({ description: "mods", default: ["q_proj"] });
const withDef = Schema.Int.annotate({ description: "D", default: 3 }).pipe(Schema.withDecodingDefaultKey(Effect.succeed(3)));
const keyAnn = Schema.Int.pipe(Schema.annotateKey({ description: "keyDesc", default: 5 }));
const show = (name: string, s: Schema.Top) => {
  const ast = s.ast as any;
  console.log(name, ast._tag, "checks:", ast.checks?.map((c: any) => c.annotations), "ann:", SchemaAST.resolve(s.ast), "ctx:", ast.context, "enc:", ast.encoding?.length,
    ast._tag === "Union" ? ast.types.map((t: any) => t._tag + ":" + t.literal) : "",
    ast._tag === "Arrays" ? ast.rest.map((t: any) => t._tag) : "");
};
show("steps", steps); show("lit", lit); show("nul", nul); show("arr", arr); show("arrLit", arrLit); show("withDef", withDef); show("keyAnn", keyAnn);
const S = Schema.Struct({ steps, withDef, keyAnn });
console.log(Object.keys(S.fields));
for (const [k, f] of Object.entries(S.fields)) console.log(k, SchemaAST.resolveDescription(f.ast), SchemaAST.resolveAt("default")(f.ast));
const props = (S.ast as any).propertySignatures.map((p: any) => [p.name, p.type._tag, SchemaAST.resolve(p.type)]);
console.log(props);
