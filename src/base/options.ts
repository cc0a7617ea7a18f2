/**
 * Options as annotated Schemas: each configuration (training, GRPO, LoRA, optimizer, server) is a
 * record of field schemas whose annotations carry the default, the help text and the allowed
 * values in words. The config-file decoder here and the command-line flags (src/cli/flags.ts)
 * are both derived from that one record, so a default or a bound is written once.
 *
 * Decoding accepts any key spelling (camelCase, TRL's snake_case, kebab-case), names an unknown
 * key with the closest known one, and reports the first bad value as one line naming the option,
 * the value given and what is allowed.
 * @module
 */
import { Effect, Exit, Schema, SchemaAST } from "effect";
import { taggedError, type TaggedErrorClass } from "./tagged_error.ts";

/** What an option field documents about itself. */
export interface OptionDoc<T> {
  /** Help text, one sentence. */
  readonly description: string;
  /** The value when none is given; absent = the option is required. */
  readonly default?: T;
  /** The allowed values in words, e.g. `an integer >= 1` or `"lora" | "full"`. */
  readonly allowed: string;
}

/** A field schema annotated with its default, help text and allowed values. */
export const option = <S extends Schema.Top>(schema: S, doc: OptionDoc<S["Type"]>): S =>
  schema.annotate({
    description: doc.description,
    allowed: doc.allowed,
    ...("default" in doc ? { default: doc.default, hasDefault: true } : {}),
  } as never) as S;

/** Literal choices with `allowed` spelled as `"a" | "b"`. */
export const choice = <const L extends readonly [string, ...string[]]>(
  values: L,
  doc: Omit<OptionDoc<L[number]>, "allowed">,
): Schema.Literals<L> =>
  option(Schema.Literals(values), {
    ...doc,
    allowed: values.map((v) => JSON.stringify(v)).join(" | "),
  });

/** Bounds of a numeric option. */
export interface NumberBounds {
  readonly min?: number;
  readonly max?: number;
  /** The bounds themselves are excluded. */
  readonly exclusiveMin?: boolean;
  readonly exclusiveMax?: boolean;
}

/** What a numeric option documents: the allowed values are spelled from its bounds. */
export interface NumberDoc<T> extends Omit<OptionDoc<T>, "allowed"> {
  /** Appended to the allowed values in parentheses, e.g. `0 = off`. */
  readonly note?: string;
  /** The option may be null; the text says what null means (true: nothing). */
  readonly nullable?: string | true;
}

const spellBounds = (kind: string, b: NumberBounds): string => {
  if (b.min !== undefined && b.max !== undefined) {
    return kind === "an integer" && !b.exclusiveMin && !b.exclusiveMax
      ? `${kind} in ${b.min}..${b.max}`
      : `${kind} in ${b.exclusiveMin ? "(" : "["}${b.min}, ${b.max}${b.exclusiveMax ? ")" : "]"}`;
  }
  if (b.min !== undefined) return `${kind} ${b.exclusiveMin ? ">" : ">="} ${b.min}`;
  if (b.max !== undefined) return `${kind} ${b.exclusiveMax ? "<" : "<="} ${b.max}`;
  return kind === "an integer" ? "an integer" : "a finite number";
};

const boundedNumber = (int: boolean, b: NumberBounds): Schema.Top => {
  const base = int ? Schema.Int : Schema.Finite;
  if (b.min !== undefined && b.max !== undefined) {
    return base.check(
      Schema.isBetween({
        minimum: b.min,
        maximum: b.max,
        exclusiveMinimum: b.exclusiveMin,
        exclusiveMaximum: b.exclusiveMax,
      }),
    );
  }
  if (b.min !== undefined) {
    return base.check(
      b.exclusiveMin ? Schema.isGreaterThan(b.min) : Schema.isGreaterThanOrEqualTo(b.min),
    );
  }
  if (b.max !== undefined) {
    return base.check(
      b.exclusiveMax ? Schema.isLessThan(b.max) : Schema.isLessThanOrEqualTo(b.max),
    );
  }
  return base;
};

const numeric =
  (int: boolean) =>
  <T extends number | null = number>(bounds: NumberBounds, doc: NumberDoc<T>): Schema.Codec<T> => {
    const { note, nullable, ...rest } = doc;
    const schema = boundedNumber(int, bounds);
    const allowed = spellBounds(int ? "an integer" : "a number", bounds) +
      (note ? ` (${note})` : "") +
      (nullable === undefined ? "" : nullable === true ? ", or null" : `, or null (${nullable})`);
    return option(nullable === undefined ? schema : Schema.NullOr(schema), {
      ...rest,
      allowed,
    } as OptionDoc<unknown>) as unknown as Schema.Codec<T>;
  };

/** An integer option within bounds, e.g. `integer({ min: 1 }, { default: 8, description })`. */
export const integer: <T extends number | null = number>(
  bounds: NumberBounds,
  doc: NumberDoc<T>,
) => Schema.Codec<T> = numeric(true);

/** A finite number option within bounds. */
export const finite: <T extends number | null = number>(
  bounds: NumberBounds,
  doc: NumberDoc<T>,
) => Schema.Codec<T> = numeric(false);

/** A boolean option. */
export const flag = (doc: Omit<OptionDoc<boolean>, "allowed">): Schema.Codec<boolean> =>
  option(Schema.Boolean, { ...doc, allowed: "true | false" });

/** The record of one configuration's option fields, keyed by camelCase name. */
export type OptionFields = Readonly<Record<string, Schema.Top>>;

/** The decoded value of a record of fields. */
export type OptionValues<F extends OptionFields> = { readonly [K in keyof F]: F[K]["Type"] };

/** The help text of a field. */
export const optionDescription = (s: Schema.Top): string =>
  SchemaAST.resolveDescription(s.ast) ?? "";

/** The allowed values of a field, in words. */
export const optionAllowed = (s: Schema.Top): string =>
  (SchemaAST.resolveAt("allowed")(s.ast) as string | undefined) ?? "";

/** Whether a field has a default (it may be null). */
export const optionHasDefault = (s: Schema.Top): boolean =>
  SchemaAST.resolveAt("hasDefault")(s.ast) === true;

/** The default of a field (undefined when it has none). */
export const optionDefault = (s: Schema.Top): unknown => SchemaAST.resolveAt("default")(s.ast);

/** camelCase of a snake_case or kebab-case key (camelCase keys are unchanged). */
export const camelCase = (key: string): string =>
  key.replace(/[-_]([a-z0-9])/g, (_, c: string) => c.toUpperCase());

/** snake_case of a camelCase key: TRL's spelling. */
export const snakeCase = (key: string): string =>
  key.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`);

/** kebab-case of a camelCase key: the flag's spelling. */
export const kebabCase = (key: string): string =>
  key.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`);

const editDistance = (a: string, b: string): number => {
  const row = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    let prev = row[0];
    row[0] = i;
    for (let j = 1; j <= b.length; j++) {
      const cur = row[j];
      row[j] = Math.min(row[j] + 1, row[j - 1] + 1, prev + (a[i - 1] === b[j - 1] ? 0 : 1));
      prev = cur;
    }
  }
  return row[b.length];
};

/** The known name closest to `key` (ignoring case, `-` and `_`), if it is close. */
export const closestName = (key: string, names: Iterable<string>): string | null => {
  const norm = (s: string) => s.toLowerCase().replace(/[-_]/g, "");
  let best: string | null = null;
  let bestD = Infinity;
  for (const n of names) {
    const d = editDistance(norm(key), norm(n));
    if (d < bestD) [best, bestD] = [n, d];
  }
  return best !== null && bestD <= 3 ? best : null;
};

/** A value as it appears in a message: JSON, cut at 60 characters. */
export const renderValue = (v: unknown): string => {
  if (v === undefined) return "undefined";
  let s: string;
  try {
    s = JSON.stringify(v) ?? String(v);
  } catch {
    s = String(v);
  }
  return s.length > 60 ? `${s.slice(0, 57)}...` : s;
};

/** Fields of an {@link InvalidOption}. */
export interface InvalidOptionFields {
  /** The option's camelCase name, the unknown key as given, or `*` for the input as a whole. */
  readonly option: string;
  /** What is wrong, one line, naming the option. */
  readonly reason: string;
}

const InvalidOptionBase: TaggedErrorClass<"InvalidOption", InvalidOptionFields> = taggedError(
  "InvalidOption",
  (e) => e.reason,
);
/** A bad option name or value; each configuration re-tags it as its own error. */
export class InvalidOption extends InvalidOptionBase {}

/** How {@link decodeOptions} names and fills options. */
export interface DecodeOptionsSettings {
  /** How an option is named in messages (default `option <name>`). */
  readonly label?: (name: string) => string;
  /** What an unknown key is called in its message (default `option`). */
  readonly noun?: string;
  /** Further input keys that mean an option (deprecated names), key -> camelCase name. */
  readonly aliases?: Readonly<Record<string, string>>;
  /** Defaults that replace the fields' own (e.g. a task's recommended values). */
  readonly defaults?: Readonly<Record<string, unknown>>;
}

/** The camelCase option an input key names, or undefined. */
export const optionKey = (
  fields: OptionFields,
  key: string,
  aliases: Readonly<Record<string, string>> = {},
): string | undefined => {
  if (Object.hasOwn(fields, key)) return key;
  if (Object.hasOwn(aliases, key)) return aliases[key];
  const c = camelCase(key);
  return Object.hasOwn(fields, c) ? c : undefined;
};

/** Checks one value against its field; the failure is one line naming the option. */
export const checkOption = (
  fields: OptionFields,
  name: string,
  value: unknown,
  label: (name: string) => string = (n) => `option ${n}`,
): Effect.Effect<unknown, InvalidOption> => {
  const schema = fields[name];
  const exit = Schema.decodeUnknownExit(schema as Schema.Codec<unknown>)(value);
  return Exit.isSuccess(exit) ? Effect.succeed(exit.value) : Effect.fail(
    new InvalidOption({
      option: name,
      reason: `${label(name)}: got ${renderValue(value)}; allowed: ${optionAllowed(schema)}`,
    }),
  );
};

/**
 * Decodes options given under any key spelling, filling defaults. `undefined` values and a
 * missing input mean "use the default". Fails on the first unknown key, duplicate spelling, bad
 * value or missing required option.
 */
export const decodeOptions = <F extends OptionFields>(
  fields: F,
  input: unknown,
  settings: DecodeOptionsSettings = {},
): Effect.Effect<OptionValues<F>, InvalidOption> =>
  Effect.gen(function* () {
    const label = settings.label ?? ((n: string) => `option ${n}`);
    const fail = (option: string, reason: string) =>
      Effect.fail(new InvalidOption({ option, reason }));
    if (input === undefined || input === null) input = {};
    if (typeof input !== "object" || Array.isArray(input)) {
      return yield* fail("*", `options must be an object, got ${renderValue(input)}`);
    }
    const out: Record<string, unknown> = {};
    const source: Record<string, string> = {};
    for (const [key, value] of Object.entries(input as Record<string, unknown>)) {
      const name = optionKey(fields, key, settings.aliases);
      if (name === undefined) {
        const near = closestName(camelCase(key), Object.keys(fields));
        return yield* fail(
          key,
          `unknown ${settings.noun ?? "option"} "${key}"${near ? `; did you mean ${near}?` : ""}`,
        );
      }
      if (value === undefined) continue;
      if (name in source) {
        return yield* fail(
          name,
          `${label(name)} is given twice, as "${source[name]}" and "${key}"`,
        );
      }
      source[name] = key;
      out[name] = yield* checkOption(fields, name, value, label);
    }
    for (const [name, schema] of Object.entries(fields)) {
      if (name in out) continue;
      if (settings.defaults && Object.hasOwn(settings.defaults, name)) {
        out[name] = yield* checkOption(fields, name, settings.defaults[name], label);
      } else if (optionHasDefault(schema)) out[name] = optionDefault(schema);
      else {return yield* fail(
          name,
          `${label(name)} is required; allowed: ${optionAllowed(schema)}`,
        );}
    }
    return out as OptionValues<F>;
  });

/**
 * The fields as one Schema struct, each key optional with its default: decoding with it directly
 * gives Effect's own error text, {@link decodeOptions} gives one clear line.
 */
export const optionsSchema = <F extends OptionFields>(
  fields: F,
): Schema.Codec<OptionValues<F>, Partial<OptionValues<F>>> =>
  Schema.Struct(
    Object.fromEntries(
      Object.entries(fields).map(([k, s]) => [
        k,
        optionHasDefault(s)
          ? s.pipe(Schema.withDecodingDefaultKey(Effect.succeed(optionDefault(s) as never)))
          : s,
      ]),
    ),
  ) as unknown as Schema.Codec<OptionValues<F>, Partial<OptionValues<F>>>;
