/**
 * Command line: `train` (GRPO), `serve` (vLLM-compatible server), `pretrain` (the built-in base
 * model). Bad options print one line naming the option and the allowed values, exit code 2.
 * @module
 */
import { Effect } from "effect";
import process from "node:process";
import { decodeTrainConfig, parseArgs } from "../app/config.ts";
import { runTraining } from "../app/trainer.ts";
import { arithmeticGrpoTask } from "../task/arithmetic_task.ts";
import { serverLayer } from "../app/server_layer.ts";

const isTty = (): boolean => Boolean((process.stdout as { isTTY?: boolean }).isTTY);

/** Prints a line; transient lines overwrite each other on a terminal. */
export const logLine = (line: string, transient = false): void => {
  if (transient && isTty()) process.stdout.write(`\r\x1b[2K${line}`);
  else process.stdout.write(`${transient || !isTty() ? "" : "\r\x1b[2K"}${line}\n`);
};

const usage =
  `usage: deno task train [--steps N] [--mode lora|full] [--engine local|server] [--config FILE] ...
       deno task serve --model DIR [--port N] ...
       deno task pretrain [--steps N] [--seed N]`;

/** Entry point; returns the exit code. */
export const main = async (argv: readonly string[]): Promise<number> => {
  const [cmd, ...args] = argv;
  if (cmd === "train") {
    const exit = await Effect.runPromiseExit(
      parseArgs(args).pipe(
        Effect.flatMap(decodeTrainConfig),
        Effect.flatMap((cfg) =>
          runTraining(cfg, arithmeticGrpoTask({ heldOutSize: cfg.evalSize }), {
            log: logLine,
            rollout: cfg.engine === "server" ? serverLayer : undefined,
          })
        ),
      ),
    );
    if (exit._tag === "Success") return 0;
    const err = exit.cause;
    const failure = (err as unknown as {
      reasons?: { _tag: string; error?: { _tag?: string; message?: string } }[];
    })
      .reasons?.find((r) => r._tag === "Fail")?.error;
    if (failure?._tag === "TrainConfigError") {
      console.error(`train: ${failure.message}`);
      return 2;
    }
    console.error(`train failed: ${failure?._tag ?? "defect"}: ${failure?.message ?? String(err)}`);
    return 1;
  }
  if (cmd === "serve") {
    const { serveMain } = await import("../server/main.ts");
    await serveMain([...args]);
    return 0;
  }
  if (cmd === "pretrain") {
    const { pretrainMain } = await import("./pretrain.ts");
    return await pretrainMain([...args]);
  }
  console.error(usage);
  return 2;
};

if (import.meta.main) process.exit(await main(process.argv.slice(2)));
