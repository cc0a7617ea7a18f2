/**
 * A RolloutEngine over a vLLM-compatible server's /v1/completions (a real vLLM, or lorafold's
 * embedded server). Token-id prompts, every sampling field sent explicitly (omitted fields would
 * take the model's generation_config defaults), logprobs 0, return_token_ids, stop_token_ids, the
 * routed version's model name and cache_salt. Requests with a seed go one per HTTP request (sample
 * j of a request uses seed + j, exactly as the in-process engine), concurrently, so the server
 * batches them; unseeded requests with equal settings share one batched request. Choices map back
 * by index = prompt * n + j. `policyVersion` is the version routed when the call started.
 * @module
 */
import { Effect } from "effect";
import {
  type RolloutCompletion,
  type RolloutEngineShape,
  RolloutError,
  type RolloutRequest,
  type RolloutResult,
} from "../ports/rollout_engine.ts";
import {
  type CompletionChoiceData,
  decodeCompletion,
  describeHttpError,
  explicitCompletionFields,
  type VllmClient,
  type VllmHttpError,
} from "../vllm/client.ts";
import type { Route, Routing } from "../vllm/routing.ts";

/** The /v1/completions body of one call (prompts share the request's sampling settings). */
export const completionBody = (
  route: Route,
  prompts: readonly (readonly number[])[],
  r: RolloutRequest,
): Record<string, unknown> => ({
  model: route.model,
  prompt: prompts.length === 1 ? [...prompts[0]] : prompts.map((p) => [...p]),
  n: r.n,
  max_tokens: r.maxTokens,
  ...explicitCompletionFields,
  temperature: r.temperature,
  top_p: r.topP,
  top_k: r.topK > 0 ? r.topK : -1,
  seed: r.seed,
  stop_token_ids: [...r.stopTokenIds],
  ignore_eos: false,
  skip_special_tokens: true,
  cache_salt: route.cacheSalt,
});

/** Groups requests into calls: seeded ones alone, unseeded ones by equal settings. */
export const groupRequests = (requests: readonly RolloutRequest[]): number[][] => {
  const groups = new Map<string, number[]>();
  const out: number[][] = [];
  requests.forEach((r, i) => {
    if (r.n <= 0) return;
    if (r.seed !== null) {
      out.push([i]);
      return;
    }
    const key = JSON.stringify([r.n, r.maxTokens, r.temperature, r.topP, r.topK, r.stopTokenIds]);
    const g = groups.get(key);
    if (g) g.push(i);
    else {
      const ng = [i];
      groups.set(key, ng);
      out.push(ng);
    }
  });
  return out;
};

/** Settings of the server rollout engine. */
export interface ServerRolloutOptions {
  /** HTTP calls in flight at once (default 32). */
  readonly concurrency?: number;
}

/** A RolloutEngine over /v1/completions, generating from the version `routing` points to. */
export const makeServerRolloutEngine = (
  client: VllmClient,
  routing: Routing,
  options: ServerRolloutOptions = {},
): RolloutEngineShape => {
  const name = `server(${client.baseUrl})`;
  const rolloutError = (reason: string, cause?: unknown) =>
    new RolloutError({ engine: name, reason, cause });
  const call = (route: Route, requests: readonly RolloutRequest[], group: readonly number[]) => {
    const r = requests[group[0]];
    return client.postJson(
      "/v1/completions",
      completionBody(route, group.map((i) => requests[i].prompt), r),
      // generating changes nothing on the server: a lost answer is asked for again
      { idempotent: true },
    ).pipe(
      Effect.flatMap((j) => decodeCompletion(j)),
      Effect.mapError((e: VllmHttpError) => rolloutError(describeHttpError(e), e)),
      Effect.flatMap((choices) => {
        const slots: (RolloutCompletion | null)[][] = group.map(() =>
          Array.from({ length: r.n }, () => null)
        );
        for (const c of choices as CompletionChoiceData[]) {
          const p = Math.floor(c.index / r.n);
          const j = c.index % r.n;
          if (p >= group.length || slots[p][j] !== null) {
            return Effect.fail(rolloutError(`unexpected or duplicate choice index ${c.index}`));
          }
          if (c.logprobs === null || c.logprobs.some((x) => x === null)) {
            return Effect.fail(
              rolloutError(`choice ${c.index} has no logprobs (the request asked for logprobs 0)`),
            );
          }
          slots[p][j] = {
            tokens: c.tokens,
            // NaN where vLLM clamped the value (unknown); the update stage does not correct those
            logprobs: c.logprobs as number[],
            finishReason: c.finishReason,
          };
        }
        const missing = slots.findIndex((s) => s.some((x) => x === null));
        if (missing >= 0) {
          return Effect.fail(rolloutError(`the answer lacks choices of prompt ${missing}`));
        }
        return Effect.succeed(slots as RolloutCompletion[][]);
      }),
    );
  };
  const generate = Effect.fn("ServerRolloutEngine.generate")(function* (
    requests: readonly RolloutRequest[],
  ): Effect.fn.Return<RolloutResult, RolloutError> {
    const route = routing.begin();
    if (!route) return yield* Effect.fail(rolloutError("no snapshot pushed yet"));
    const groups = groupRequests(requests);
    return yield* Effect.forEach(groups, (g) => call(route, requests, g), {
      concurrency: options.concurrency ?? 32,
    }).pipe(
      Effect.map((answers) => {
        const completions: RolloutCompletion[][] = requests.map(() => []);
        groups.forEach((g, gi) => g.forEach((ri, p) => (completions[ri] = answers[gi][p])));
        return { completions, policyVersion: route.version };
      }),
      Effect.ensuring(routing.end(route)),
    );
  });
  return { name, generate };
};
