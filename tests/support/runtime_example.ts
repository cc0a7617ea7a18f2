// Runs examples/dynamic_sampling.ts for 3 steps and prints its result as JSON: the cross-runtime
// test runs this file under Bun and compares with the same run under Deno.
import { Effect } from "effect";
import { runExample } from "../../examples/dynamic_sampling.ts";

console.log(JSON.stringify(await Effect.runPromise(runExample(3))));
