/**
 * `deno task bench`: runs every bench and writes bench/results/<topic>.json.
 * @module
 */
import { writeResult } from "./common.ts";

const topics: [string, () => Promise<Record<string, number | string>>][] = [
  ["matmul", async () => (await import("./matmul.ts")).run()],
  ["attention", async () => (await import("./attention.ts")).run()],
  ["model", async () => (await import("./model.ts")).run()],
  ["push", async () => (await import("./push.ts")).run()],
  ["train", async () => (await import("./train.ts")).run()],
  // null marks a measurement that failed or was skipped (the JSON says why)
  [
    "scale",
    async () => (await import("./scale.ts")).run() as Promise<Record<string, number | string>>,
  ],
];

const only = Deno.args.filter((a) => !a.startsWith("-"));
for (const [topic, run] of topics) {
  if (only.length > 0 && !only.includes(topic)) continue;
  console.log(`bench ${topic} ...`);
  console.log(await writeResult(topic, await run()));
}
