/**
 * Command-line flags derived from annotated option fields (src/base/options.ts): one flag per
 * field, named in kebab-case, its help text the field's description with its default and allowed
 * values. Values parse by the field's type — numbers, `null`, and comma lists such as
 * `--reward-weights 1,0.5` or `--target-modules q_proj,v_proj` — and are checked against the
 * field's schema as they are parsed, so a bad value is one line naming the flag.
 * @module
 */
import { Effect, Exit, Option, Schema, type SchemaAST } from "effect";
import { CliError, Flag } from "effect/cli";
import {
  kebabCase,
  optionAllowed,
  optionDefault,
  optionDescription,
  type OptionFields,
  optionHasDefault,
} from "../base/options.ts";

/** The members of a field's type, unions flattened. */
const members = (ast: SchemaAST.AST): SchemaAST.AST[] =>
  ast._tag === "Union" ? ast.types.flatMap(members) : [ast];

/** The field's type without its `null` member: one AST, or the literal choices. */
const shapeOf = (
  ast: SchemaAST.AST,
): {
  readonly nullable: boolean;
  readonly type: SchemaAST.AST | null;
  readonly literals: unknown[] | null;
} => {
  const all = members(ast);
  const rest = all.filter((t) => t._tag !== "Null");
  const literals = rest.every((t) => t._tag === "Literal")
    ? rest.map((t) => (t as SchemaAST.Literal).literal)
    : null;
  return { nullable: rest.length < all.length, type: rest.length === 1 ? rest[0] : null, literals };
};

/** A flag's text as the field's value (unparseable text stays text: the schema rejects it). */
export const valueFromText = (ast: SchemaAST.AST, text: string): unknown => {
  const shape = shapeOf(ast);
  if (shape.nullable && text === "null") return null;
  const lits = shape.literals;
  if (lits !== null) {
    const n = Number(text);
    return lits.includes(text) ? text : text.trim() !== "" && lits.includes(n) ? n : text;
  }
  const t = shape.type;
  if (t === null) return text;
  if (t._tag === "Number") {
    return text.trim() === "" || Number.isNaN(Number(text)) ? text : Number(text);
  }
  if (t._tag === "Boolean") return text === "true" ? true : text === "false" ? false : text;
  if (t._tag === "Arrays" && t.elements.length === 0 && t.rest.length === 1) {
    return text.split(",").map((x) => x.trim()).filter((x) => x !== "").map((x) =>
      valueFromText(t.rest[0], x)
    );
  }
  return text;
};

const metavarOf = (ast: SchemaAST.AST): string => {
  const shape = shapeOf(ast);
  if (shape.literals !== null) return "choice";
  const t = shape.type;
  if (t === null) return "string";
  if (t._tag === "Number") {
    const int = (t.checks ?? []).some((c) =>
      (c.annotations as { representation?: { id?: string } } | undefined)?.representation?.id ===
        "effect/schema/isInt"
    );
    return int ? "integer" : "number";
  }
  if (t._tag === "Arrays") return "list";
  return "string";
};

const showDefault = (v: unknown): string =>
  v === null ? "null" : Array.isArray(v) ? v.join(",") : String(v);

/** Help text of a field: its description, default (the override when given) and allowed values. */
export const helpOf = (schema: Schema.Top, override?: { readonly value: unknown }): string => {
  const d = override ?? (optionHasDefault(schema) ? { value: optionDefault(schema) } : null);
  return `${optionDescription(schema)}. Default: ${
    d === null ? "none (required)" : showDefault(d.value)
  }. Allowed: ${optionAllowed(schema)}.`;
};

/** How flags are derived from fields. */
export interface FlagSettings {
  /** Defaults shown in help instead of the fields' own (e.g. a task's recommended values). */
  readonly defaults?: Readonly<Record<string, unknown>>;
  /** Fields without a default still get an optional flag (their value may come from a file). */
  readonly allOptional?: boolean;
  /** Text put before a flag's help, keyed by the flag's key (e.g. "Same as --steps"). */
  readonly helpPrefix?: Readonly<Record<string, string>>;
  /** Rewrites a field's parsed value before it is checked (e.g. PEFT's `all-linear`). */
  readonly normalize?: Readonly<Record<string, (value: unknown) => unknown>>;
}

/** The flag of one field: a value if given (Option), checked against the field's schema. */
export const flagOf = (
  key: string,
  schema: Schema.Top,
  settings: FlagSettings = {},
): Flag.Flag<Option.Option<unknown>> => {
  const name = kebabCase(key);
  const override = settings.defaults && Object.hasOwn(settings.defaults, key)
    ? { value: settings.defaults[key] }
    : undefined;
  const prefix = settings.helpPrefix?.[key];
  const help = (prefix === undefined ? "" : `${prefix}. `) + helpOf(schema, override);
  const normalize = settings.normalize?.[key] ?? ((v: unknown) => v);
  const check = (value: unknown, text: string) => {
    const exit = Schema.decodeUnknownExit(schema as Schema.Codec<unknown>)(value);
    return Exit.isSuccess(exit) ? Effect.succeed(exit.value) : Effect.fail(
      new CliError.InvalidValue({
        option: name,
        value: text,
        expected: optionAllowed(schema),
        kind: "flag",
      }),
    );
  };
  const base: Flag.Flag<unknown> = schema.ast._tag === "Boolean"
    ? Flag.Boolean(name)
    : Flag.String(name).pipe(
      Flag.withMetavar(metavarOf(schema.ast)),
      Flag.mapEffect((text) => check(normalize(valueFromText(schema.ast, text)), text)),
    );
  const described = base.pipe(Flag.withDescription(help));
  // every flag is optional at parse time when it has a default (filled when options are decoded)
  return optionHasDefault(schema) || override || settings.allOptional
    ? Flag.optional(described)
    : described.pipe(Flag.map((v) => Option.some(v)));
};

/** The flags of a record of fields, keyed as the fields. */
export const flagsOf = (
  fields: OptionFields,
  settings: FlagSettings = {},
): Record<string, Flag.Flag<Option.Option<unknown>>> =>
  Object.fromEntries(Object.entries(fields).map(([k, s]) => [k, flagOf(k, s, settings)]));

/**
 * Flags under other names (TRL's) for fields: each alias key gets its own optional flag with
 * its field's type, help saying what it stands for. Their values keep the alias key, so the
 * options decoder resolves them (and rejects an option given under two names).
 */
export const aliasFlagsOf = (
  fields: OptionFields,
  aliases: Readonly<Record<string, string>>,
  settings: FlagSettings = {},
): Record<string, Flag.Flag<Option.Option<unknown>>> =>
  Object.fromEntries(
    Object.entries(aliases).map(([alias, key]) => [
      alias,
      flagOf(alias, fields[key], {
        ...settings,
        allOptional: true,
        defaults: settings.defaults && Object.hasOwn(settings.defaults, key)
          ? { [alias]: settings.defaults[key] }
          : undefined,
        normalize: settings.normalize?.[key] ? { [alias]: settings.normalize[key] } : undefined,
        helpPrefix: { [alias]: `Same as --${kebabCase(key)} (TRL's name)` },
      }),
    ]),
  );

/** The values given on the command line (absent flags left out). */
export const givenValues = (
  values: Readonly<Record<string, Option.Option<unknown>>>,
): Record<string, unknown> =>
  Object.fromEntries(
    Object.entries(values).flatMap(([k, v]) => (Option.isSome(v) ? [[k, v.value]] : [])),
  );
