/**
 * The command line: `lorafold train` (GRPO), `lorafold serve` (the vLLM-compatible server) and
 * `lorafold pretrain` (the built-in base model), built with effect/cli. Every flag is derived from
 * an annotated option field (src/cli/flags.ts), so `--help` lists each with its default and
 * allowed values. A bad flag or option prints one line and exits with code 2 (an unknown flag
 * names the closest one); a failed run exits with code 1.
 * @module
 */
import { Cause, Effect, Exit, FileSystem, Layer, Option, Path, Stdio, Terminal } from "effect";
import { CliConfig, CliError, CliOutput, Command, Flag, GlobalFlag } from "effect/cli";
import { ChildProcessSpawner } from "effect/process";
import process from "node:process";
import { taggedError, type TaggedErrorClass } from "../base/tagged_error.ts";
import { grpoOptionFields } from "../grpo/config.ts";
import { decodeServeConfig, serveOptionFields } from "../server/config.ts";
import { serve } from "../server/serve.ts";
import { arithmeticTaskDefaults } from "../task/arithmetic_task.ts";
import {
  decodeTrainConfig,
  expandTargetModules,
  readTrainConfigFile,
  type TrainConfig,
  trainFlagAliases,
  trainOptionAliases,
  trainOptionFields,
} from "../app/config.ts";
import { BUILTIN_DATASET, trainTaskOf } from "../app/train_task.ts";
import { runTraining } from "../app/trainer.ts";
import { serverLayer } from "../app/server_layer.ts";
import { aliasFlagsOf, flagsOf, givenValues } from "./flags.ts";
import { type PretrainCommandOptions, pretrainOptionFields, runPretrain } from "./pretrain.ts";
import { decodeOptions, optionKey } from "../base/options.ts";

const isTty = (): boolean => Boolean((process.stdout as { isTTY?: boolean }).isTTY);

/** Prints a line; transient lines overwrite each other on a terminal. */
export const logLine = (line: string, transient = false): void => {
  if (transient && isTty()) process.stdout.write(`\r\x1b[2K${line}`);
  else process.stdout.write(`${transient || !isTty() ? "" : "\r\x1b[2K"}${line}\n`);
};

const CommandExitBase: TaggedErrorClass<"CommandExit", {
  readonly command: string;
  readonly code: number;
}> = taggedError(
  "CommandExit",
  (e) => `${e.command} exited with code ${e.code}`,
);
/** A command that ended with a non-zero exit code after reporting why itself. */
class CommandExit extends CommandExitBase {}

const ServeFailedBase: TaggedErrorClass<"ServeFailed", { readonly reason: string }> = taggedError(
  "ServeFailed",
  (e) => `the server stopped: ${e.reason}`,
);
/** The server could not listen or stopped with an error (e.g. the port is taken). */
class ServeFailed extends ServeFailedBase {}

// ---- train --------------------------------------------------------------------------------------

const configFlag = Flag.String("config").pipe(
  Flag.withMetavar("FILE"),
  Flag.withDescription(
    "JSON file of options (camelCase or TRL's snake_case keys); flags given here win over it.",
  ),
  Flag.optional,
);

/** Every option of `train`: run, LoRA, optimizer and GRPO fields. */
const trainFlagSettings = {
  defaults: arithmeticTaskDefaults,
  normalize: { targetModules: expandTargetModules },
};
const trainFlags = {
  ...flagsOf({ ...trainOptionFields, ...grpoOptionFields }, trainFlagSettings),
  ...aliasFlagsOf(trainOptionFields, trainFlagAliases, trainFlagSettings),
};

/** The dataset the input names (any spelling), the built-in task's when none. */
const datasetOf = (input: Readonly<Record<string, unknown>>): unknown => {
  for (const [k, v] of Object.entries(input)) {
    if (optionKey(trainOptionFields, k, trainOptionAliases) === "dataset" && v !== undefined) {
      return v;
    }
  }
  return BUILTIN_DATASET;
};

/** The train config of parsed flags: the config file's options, then the flags given, decoded. */
const trainConfigOf = (
  config: Option.Option<string>,
  flags: Record<string, Option.Option<unknown>>,
) =>
  Effect.gen(function* () {
    const file = Option.isSome(config) ? yield* readTrainConfigFile(config.value) : {};
    const input = { ...file, ...givenValues(flags) };
    // the built-in task's recommended values; a dataset starts from TRL's defaults
    const defaults = datasetOf(input) === BUILTIN_DATASET ? arithmeticTaskDefaults : {};
    return yield* decodeTrainConfig(input, defaults);
  });

const trainCommand = (run: (cfg: TrainConfig) => Effect.Effect<void, unknown>) =>
  Command.make(
    "train",
    { config: configFlag, options: trainFlags },
    ({ config, options }) => Effect.flatMap(trainConfigOf(config, options), run),
  ).pipe(
    Command.withDescription(
      "GRPO fine-tuning (LoRA or full) of the built-in arithmetic task or of a prompt dataset " +
        "(--dataset FILE.jsonl|.parquet --reward-funcs accuracy,./my_reward.ts), with rollouts " +
        "in-process or from a vLLM-compatible server. Options use TRL's GRPOConfig names in " +
        "kebab-case; defaults shown are the built-in task's (a dataset starts from TRL's).",
    ),
  );

const train = (cfg: TrainConfig) =>
  Effect.flatMap(trainTaskOf(cfg), ({ task, config }) =>
    runTraining(config, task, {
      log: logLine,
      rollout: config.engine === "server" ? serverLayer : undefined,
    })).pipe(Effect.asVoid);

// ---- serve --------------------------------------------------------------------------------------

const serveCommand = Command.make(
  "serve",
  flagsOf(serveOptionFields),
  (flags) =>
    Effect.gen(function* () {
      const cfg = yield* decodeServeConfig(givenValues(flags));
      const code = yield* Effect.tryPromise({
        try: () => serve(cfg),
        catch: (e) =>
          new ServeFailed({ reason: e instanceof Error ? `${e.name}: ${e.message}` : String(e) }),
      });
      if (code !== 0) return yield* Effect.fail(new CommandExit({ command: "serve", code }));
    }),
).pipe(
  Command.withDescription(
    "The vLLM-compatible OpenAI server (completions, tokenize, LoRA load/unload, dev routes). " +
      "Environment: VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 (runtime LoRA routes), " +
      "VLLM_SERVER_DEV_MODE=1 (pause, resume, collective_rpc, reset_prefix_cache).",
  ),
);

// ---- pretrain -----------------------------------------------------------------------------------

const pretrainCommand = Command.make(
  "pretrain",
  flagsOf(pretrainOptionFields),
  (flags) =>
    decodeOptions(pretrainOptionFields, givenValues(flags)).pipe(
      Effect.flatMap((o) => runPretrain(o as unknown as PretrainCommandOptions)),
    ),
).pipe(
  Command.withDescription(
    "Rebuilds the shipped base model (assets/arithmetic-base); the defaults rebuild it bit for bit.",
  ),
);

// ---- the root command and its environment -------------------------------------------------------

const lorafold = (trainRun: (cfg: TrainConfig) => Effect.Effect<void, unknown>) =>
  Command.make("lorafold").pipe(
    Command.withDescription(
      "GRPO fine-tuning with LoRA adapters, alias-free snapshots and WebGPU.",
    ),
    Command.withSubcommands([trainCommand(trainRun), serveCommand, pretrainCommand]),
  );

const unused = Effect.die("not used by lorafold's commands");

/**
 * What effect/cli needs to run, from `effect` itself: output goes through Console, so the
 * terminal, stdin and process services are never used; bad usage is one line on stderr.
 */
const cliEnvironment = Layer.mergeAll(
  FileSystem.layerNoop({}),
  Path.layer,
  Stdio.layerTest({}),
  Layer.succeed(
    Terminal.Terminal,
    Terminal.make({
      columns: Effect.succeed(100),
      rows: Effect.succeed(24),
      size: unused,
      readInput: unused,
      readLine: unused,
      display: () => Effect.void,
    }),
  ),
  Layer.succeed(ChildProcessSpawner.ChildProcessSpawner, ChildProcessSpawner.make(() => unused)),
  CliConfig.layer({ builtIns: [GlobalFlag.Help, GlobalFlag.Version] }),
  CliOutput.layer(CliOutput.defaultFormatter({ colors: false })),
  CliOutput.layerPresenter({
    present: (event) =>
      event._tag === "InvalidInvocation"
        ? Effect.sync(() =>
          console.error(
            `${event.commandPath.join(" ")}: ${
              event.errors.map((e) => e.message.replace(/\s+/g, " ")).join("; ")
            }`,
          )
        )
        : CliOutput.defaultPresenter.present(event),
  }),
);

const VERSION = "0.1.0";

const runCli = (
  argv: readonly string[],
  trainRun: (cfg: TrainConfig) => Effect.Effect<void, unknown>,
) =>
  Command.runWith(lorafold(trainRun), { version: VERSION })(argv).pipe(
    Effect.provide(cliEnvironment),
  );

const OPTION_ERRORS = new Set(["TrainConfigError", "ServeConfigError", "InvalidOption"]);

/** Entry point; returns the exit code. */
export const main = async (argv: readonly string[]): Promise<number> => {
  const exit = await Effect.runPromiseExit(runCli(argv, train));
  if (Exit.isSuccess(exit)) return 0;
  const failure = Cause.findErrorOption(exit.cause);
  if (Option.isNone(failure)) {
    console.error(`lorafold ${argv[0] ?? ""} failed: ${Cause.pretty(exit.cause)}`);
    return 1;
  }
  const e = failure.value as { readonly _tag?: string; readonly message?: string };
  if (CliError.isCliError(e)) return 2; // bad usage, already printed on one line
  if (e instanceof CommandExit) return e.code;
  if (e._tag !== undefined && OPTION_ERRORS.has(e._tag)) {
    console.error(`lorafold ${argv[0]}: ${e.message}`);
    return 2;
  }
  console.error(`lorafold ${argv[0]} failed: ${e._tag ?? "error"}: ${e.message ?? String(e)}`);
  return 1;
};

/**
 * The TrainConfig that `train` would run with for these arguments (flags, `--config FILE`),
 * without running it: for benches and tests of the command line. Fails with the CLI's or the
 * config's error.
 */
export const parseTrainArgs = (argv: readonly string[]): Effect.Effect<TrainConfig, unknown> =>
  Effect.suspend(() => {
    let parsed: TrainConfig | null = null;
    return runCli(["train", ...argv], (cfg) => Effect.sync(() => (parsed = cfg))).pipe(
      Effect.flatMap(() =>
        parsed === null
          ? Effect.fail(new CommandExit({ command: "train", code: 0 }))
          : Effect.succeed(parsed)
      ),
    );
  });

if (import.meta.main) process.exit(await main(process.argv.slice(2)));
