import { Effect, FileSystem, Layer, Path, Stdio, Terminal } from "effect";
import { Command, Flag } from "effect/cli";
import { ChildProcessSpawner } from "effect/process";

const Env = Layer.mergeAll(
  FileSystem.layerNoop({}),
  Path.layer,
  Stdio.layerTest({}),
  Layer.succeed(Terminal.Terminal, Terminal.make({
    columns: Effect.succeed(100),
    rows: Effect.succeed(24),
    size: Effect.die("unused"),
    readInput: Effect.die("unused"),
    readLine: Effect.die("unused"),
    display: () => Effect.void,
  })),
  Layer.succeed(ChildProcessSpawner.ChildProcessSpawner, ChildProcessSpawner.make(() => Effect.die("unused"))),
);

const cmd = Command.make("train", {
  steps: Flag.Int("steps").pipe(Flag.withDescription("Number of steps"), Flag.withDefault(10)),
  lr: Flag.Finite("learning-rate").pipe(Flag.withDescription("LR"), Flag.withDefault(1e-4)),
  mode: Flag.Literals("mode", ["lora", "full"]).pipe(Flag.withDescription("Mode"), Flag.withDefault("lora")),
  quiet: Flag.Boolean("quiet").pipe(Flag.withDescription("Quiet"), Flag.withDefault(false)),
  url: Flag.String("server-url").pipe(Flag.withDescription("URL"), Flag.optional),
}, (cfg) => Effect.sync(() => console.log("HANDLER", JSON.stringify(cfg))));

const argv = Deno.args;
const exit = await Effect.runPromiseExit(Command.runWith(cmd, { version: "0.1.0" })(argv).pipe(Effect.provide(Env)));
console.log("EXIT:", exit._tag, exit._tag === "Failure" ? String(exit.cause) : "");
