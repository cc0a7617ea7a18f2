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
  type RetryPolicy,
  type VllmClient,
  type VllmHttpError,
} from "../vllm/client.ts";
import type { Route } from "../vllm/routing.ts";
import type { Replica, ReplicaSet } from "../vllm/replicas.ts";

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

/**
 * Whether a failed call says the replica (not the request) is at fault: no answer, no answer in
 * time, a server error, a version it no longer serves (404), or an answer that does not decode.
 * Such a call is sent to another replica and the replica is taken out of rotation.
 */
export const replicaAtFault = (e: VllmHttpError): boolean =>
  e.reason !== "status" || e.status >= 500 || e.status === 404;

/** Retries of a call while other replicas could take it: one, then fail over. */
const failoverRetry: RetryPolicy = { baseMs: 100, factor: 2, maxDelayMs: 1000, maxRetries: 1 };

/**
 * A RolloutEngine over /v1/completions on the replicas of `replicas`, generating from the newest
 * version a serving replica routes to. With one serving replica, requests with equal unseeded
 * settings share one call; with several, each request is its own call so that calls spread over
 * the replicas by load (samples of one prompt stay together, and prefer the replica their
 * prompt's affinity names). A call whose replica fails (see {@link replicaAtFault}) takes that
 * replica out of rotation and runs on another replica serving the same version, so a replica
 * lost mid-batch loses no completion; only when none is left does the call fail.
 */
export const makeServerRolloutEngine = (
  replicas: ReplicaSet,
  options: ServerRolloutOptions = {},
): RolloutEngineShape => {
  const name = replicas.size === 1
    ? `server(${replicas.replicas[0].url})`
    : `servers(${replicas.replicas.map((r) => r.url).join(",")})`;
  const rolloutError = (reason: string, cause?: unknown) =>
    new RolloutError({ engine: name, reason, cause });

  /** One call on one replica; fails with the HTTP error (for fail-over) or a RolloutError. */
  const callOn = (
    client: VllmClient,
    route: Route,
    requests: readonly RolloutRequest[],
    group: readonly number[],
    retry: RetryPolicy | undefined,
  ) => {
    const r = requests[group[0]];
    return client.postJson(
      "/v1/completions",
      completionBody(route, group.map((i) => requests[i].prompt), r),
      // generating changes nothing on the server: a lost answer is asked for again
      { idempotent: true, ...(retry ? { retry } : {}) },
    ).pipe(
      Effect.flatMap((j) => decodeCompletion(j)),
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

  /** A call on the best replica serving `version`, failing over to the others. */
  const call = Effect.fn("ServerRolloutEngine.call")(function* (
    version: number,
    requests: readonly RolloutRequest[],
    group: readonly number[],
  ): Effect.fn.Return<RolloutCompletion[][], RolloutError> {
    const first = requests[group[0]];
    const size = group.reduce((a, i) => a + requests[i].n, 0);
    const tried = new Set<Replica>();
    let last: RolloutError | null = null;
    while (true) {
      const replica = replicas.pick(version, first.affinity ?? first.prompt, size, tried);
      const route = replica?.routing.begin(version) ?? null;
      if (!replica || !route) {
        return yield* Effect.fail(
          last ??
            rolloutError(`no serving replica serves v${version} (${replicas.describe()})`),
        );
      }
      tried.add(replica);
      const others = replicas.eligible(version, tried).length > 0;
      replica.load += size;
      const answer = yield* callOn(
        replica.client,
        route,
        requests,
        group,
        others ? failoverRetry : undefined, // else the client's own policy
      ).pipe(
        Effect.ensuring(Effect.andThen(
          Effect.sync(() => (replica.load -= size)),
          replica.routing.end(route),
        )),
        Effect.result,
      );
      if (answer._tag === "Success") {
        replica.calls++;
        return answer.success;
      }
      const e = answer.failure;
      if (e._tag === "VllmHttpError" && !replicaAtFault(e)) {
        return yield* Effect.fail(rolloutError(describeHttpError(e), e));
      }
      const why = e._tag === "VllmHttpError" ? describeHttpError(e) : e.reason;
      last = e._tag === "VllmHttpError" ? rolloutError(why, e) : e;
      // the last replica serving the version stays in rotation (the health monitor and the
      // pushes judge it): the call fails as it would on a single server
      if (!others) return yield* Effect.fail(last);
      yield* replicas.drain(
        replica,
        e._tag === "VllmHttpError" && e.reason !== "decode" && e.status !== 404
          ? "unreachable"
          : "unverified",
        `rollout call failed: ${why}`,
      );
    }
  });

  const generate = Effect.fn("ServerRolloutEngine.generate")(function* (
    requests: readonly RolloutRequest[],
  ): Effect.fn.Return<RolloutResult, RolloutError> {
    const version = replicas.currentVersion();
    if (version === null) {
      const pushed = replicas.replicas.some((r) => r.routing.current !== null);
      return yield* Effect.fail(
        rolloutError(
          pushed ? `no replica is serving (${replicas.describe()})` : "no snapshot pushed yet",
        ),
      );
    }
    // the version stays loaded on every replica serving it until the batch ends
    const pins = replicas.eligible(version).flatMap((r) => {
      const route = r.routing.begin(version);
      return route ? [{ r, route }] : [];
    });
    const groups = pins.length > 1
      ? requests.flatMap((r, i) => (r.n > 0 ? [[i]] : []))
      : groupRequests(requests);
    const answers = yield* Effect.forEach(groups, (g) => call(version, requests, g), {
      concurrency: options.concurrency ?? 32,
    }).pipe(
      Effect.ensuring(Effect.forEach(pins, ({ r, route }) => r.routing.end(route), {
        discard: true,
      })),
    );
    const completions: RolloutCompletion[][] = requests.map(() => []);
    groups.forEach((g, gi) => g.forEach((ri, p) => (completions[ri] = answers[gi][p])));
    return { completions, policyVersion: version };
  });
  return { name, generate };
};
