"""PyTorch peer of bench/scale.ts: the same decoder (Llama / Qwen2: RMSNorm, RoPE, GQA attention,
SwiGLU, tied embedding, optional q/k/v bias) built in plain torch from the same config.json with
random weights, LoRA r=16 adapters (unmerged, PEFT init: A Kaiming-uniform, B = 0) on all 7
projections, and the same measurements with the same shapes:

- logprobs: completion log-probs without gradients, batch 8 x (64 prompt + 64 completion),
  logits only for the rows that predict completion tokens;
- lora_train: forward + entropy (as the lorafold step computes it) + backward + grad-norm clip
  + AdamW on the LoRA parameters;
- generate_b8 / generate_b64: KV-cached greedy generation, 32 new tokens, 64-token prompt;
- snapshot: out-of-place fold W + s*B*A of every adapted projection into fresh tensors, SHA-256
  over names, shapes and bytes of all weights and adapters, finite check (what lorafold's
  snapshot does, minus the device readback);
- peak RSS: VmHWM of this process.

Run by bench/scale.ts (with OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE unset); prints one line
"SCALE_RESULT {json}" after every measurement, keys <model>_torch_<quantity>.
"""

import argparse
import hashlib
import json
import math
import re
import time

import torch
import torch.nn.functional as F

MARK = "SCALE_RESULT "
MEASURES = [
    "logprobs_tokens_per_s",
    "snapshot_ms",
    "generate_b8_tokens_per_s",
    "lora_train_tokens_per_s",
    "generate_b64_tokens_per_s",
]


def peak_rss_mib():
    try:
        with open("/proc/self/status") as f:
            m = re.search(r"VmHWM:\s+(\d+)\s+kB", f.read())
        return round(int(m.group(1)) / 1024, 1) if m else None
    except OSError:
        return None


class LoraLinear(torch.nn.Module):
    """y = x W^T + b + s (x A^T) B^T with W frozen."""

    def __init__(self, inp, out, bias, r, alpha, gen):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(out, inp, generator=gen) * 0.02, requires_grad=False)
        self.bias = torch.nn.Parameter(torch.zeros(out), requires_grad=False) if bias else None
        bound = 1 / math.sqrt(inp)
        self.lora_A = torch.nn.Parameter((torch.rand(r, inp, generator=gen) * 2 - 1) * bound)
        self.lora_B = torch.nn.Parameter(torch.zeros(out, r))
        self.scale = alpha / r

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale


def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class Layer(torch.nn.Module):
    def __init__(self, c, r, alpha, gen):
        super().__init__()
        H, I, nh, nkv, hd = c["hidden"], c["inter"], c["heads"], c["kv"], c["head_dim"]
        b = c["bias"]
        self.c = c
        self.q_proj = LoraLinear(H, nh * hd, b, r, alpha, gen)
        self.k_proj = LoraLinear(H, nkv * hd, b, r, alpha, gen)
        self.v_proj = LoraLinear(H, nkv * hd, b, r, alpha, gen)
        self.o_proj = LoraLinear(nh * hd, H, False, r, alpha, gen)
        self.gate_proj = LoraLinear(H, I, False, r, alpha, gen)
        self.up_proj = LoraLinear(H, I, False, r, alpha, gen)
        self.down_proj = LoraLinear(I, H, False, r, alpha, gen)
        self.input_layernorm = torch.nn.Parameter(torch.ones(H), requires_grad=False)
        self.post_attention_layernorm = torch.nn.Parameter(torch.ones(H), requires_grad=False)

    def forward(self, x, cos, sin, cache=None, offset=0):
        c = self.c
        B, T, _ = x.shape
        nh, nkv, hd = c["heads"], c["kv"], c["head_dim"]
        h = rms_norm(x, self.input_layernorm, c["eps"])
        q = self.q_proj(h).view(B, T, nh, hd).transpose(1, 2)
        k = self.k_proj(h).view(B, T, nkv, hd).transpose(1, 2)
        v = self.v_proj(h).view(B, T, nkv, hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            kc, vc = cache
            kc[:, :, offset : offset + T] = k
            vc[:, :, offset : offset + T] = v
            k, v = kc[:, :, : offset + T], vc[:, :, : offset + T]
        S = k.shape[2]
        rep = nh // nkv
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        if T > 1:
            qi = torch.arange(T).view(T, 1) + offset
            ki = torch.arange(S).view(1, S)
            scores = scores.masked_fill(ki > qi, float("-inf"))
        att = torch.softmax(scores, dim=-1) @ v
        x = x + self.o_proj(att.transpose(1, 2).reshape(B, T, nh * hd))
        h = rms_norm(x, self.post_attention_layernorm, c["eps"])
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Decoder(torch.nn.Module):
    def __init__(self, c, r, alpha, seed):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.c = c
        self.embed = torch.nn.Parameter(torch.randn(c["vocab"], c["hidden"], generator=gen) * 0.02, requires_grad=False)
        self.layers = torch.nn.ModuleList([Layer(c, r, alpha, gen) for _ in range(c["layers"])])
        self.norm = torch.nn.Parameter(torch.ones(c["hidden"]), requires_grad=False)
        hd = c["head_dim"]
        self.inv_freq = 1.0 / (c["theta"] ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))

    def rope(self, positions):
        f = positions.float().view(-1, 1) * self.inv_freq.view(1, -1)
        e = torch.cat((f, f), dim=-1)
        return e.cos(), e.sin()

    def hidden(self, ids, caches=None, offset=0):
        T = ids.shape[1]
        cos, sin = self.rope(torch.arange(offset, offset + T))
        x = F.embedding(ids, self.embed)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, None if caches is None else caches[i], offset)
        return x

    def logits(self, h):
        return F.linear(rms_norm(h, self.norm, self.c["eps"]), self.embed)

    def base_parameters(self):
        return sum(p.numel() for n, p in self.named_parameters() if "lora_" not in n)

    def lora_parameters(self):
        return [p for n, p in self.named_parameters() if "lora_" in n]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--parameters", type=int, required=True)
    ap.add_argument("--shapes", required=True)
    ap.add_argument("--budget-s", type=float, default=600)
    ap.add_argument("--repetitions", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    t0 = time.perf_counter()
    left = lambda: a.budget_s - (time.perf_counter() - t0)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    hf = json.loads(a.config)
    S = json.loads(a.shapes)
    p = f"{a.model}_torch"
    out = {f"{p}_{m}": None for m in MEASURES}
    errors, skipped = [], []

    def report():
        out[f"{p}_peak_rss_mib"] = peak_rss_mib()
        if errors:
            out[f"{p}_error"] = " | ".join(errors)
        if skipped:
            out[f"{p}_skipped"] = " | ".join(skipped)
        out[f"{p}_child_s"] = round(time.perf_counter() - t0, 1)
        print(MARK + json.dumps(out), flush=True)

    nh = hf["num_attention_heads"]
    c = {
        "hidden": hf["hidden_size"],
        "inter": hf["intermediate_size"],
        "layers": hf["num_hidden_layers"],
        "heads": nh,
        "kv": hf.get("num_key_value_heads", nh),
        "head_dim": hf.get("head_dim", hf["hidden_size"] // nh),
        "vocab": hf["vocab_size"],
        "theta": float(hf.get("rope_theta", 10000)),
        "eps": float(hf.get("rms_norm_eps", 1e-6)),
        "bias": hf["model_type"] == "qwen2" or bool(hf.get("attention_bias", False)),
    }
    assert hf.get("tie_word_embeddings") is True, "this peer builds tied embeddings only"
    with torch.no_grad():
        model = Decoder(c, S["loraR"], S["loraAlpha"], 1)
    n_params = model.base_parameters()
    out[f"{p}_parameters"] = n_params
    assert n_params == a.parameters, f"{a.model}: {n_params} parameters, expected {a.parameters}"
    out[f"{p}_torch_version"] = torch.__version__
    out[f"{p}_threads"] = torch.get_num_threads()
    out[f"{p}_build_s"] = round(time.perf_counter() - t0, 1)
    lora = model.lora_parameters()
    opt = torch.optim.AdamW(lora, lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0)
    g = torch.Generator().manual_seed(11)
    V, Bt, P, C = c["vocab"], S["batch"], S["prompt"], S["completion"]
    ids = torch.randint(0, V, (Bt, P + C), generator=g)
    # rows predicting completion tokens, and their targets (as layoutBatch in src/train/policy.ts)
    rows = torch.arange(P - 1, P + C - 1)
    targets = ids[:, P:]
    tokens = Bt * (P + C)

    def completion_logp(n):
        h = model.hidden(ids[:n])[:, rows]
        lp = torch.log_softmax(model.logits(h).reshape(-1, V), dim=-1)
        return lp, lp.gather(1, targets[:n].reshape(-1, 1)).squeeze(1)

    def logprobs(n=Bt):
        with torch.no_grad():
            return completion_logp(n)[1].tolist()

    def train_step(n=Bt):
        lp, tok = completion_logp(n)
        with torch.no_grad():
            (lp.exp() * lp).sum(-1).neg().tolist()  # entropy, as the lorafold step reads it
        logp = tok.detach().tolist()
        loss = -tok.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return logp

    def generate(batch, prompt_len=S["genPrompt"], n_new=S["genNew"]):
        with torch.no_grad():
            prompt = torch.randint(0, V, (batch, prompt_len), generator=g)
            total = prompt_len + n_new
            caches = [
                (torch.zeros(batch, c["kv"], total, c["head_dim"]), torch.zeros(batch, c["kv"], total, c["head_dim"]))
                for _ in range(c["layers"])
            ]
            h = model.hidden(prompt, caches, 0)[:, -1:]
            offset = prompt.shape[1]
            new = []
            for t in range(n_new):
                logits = model.logits(h)[:, -1]
                torch.log_softmax(logits, dim=-1)  # raw log-prob of the choice, as lorafold reports
                nxt = logits.argmax(-1)
                new.append(nxt)
                if t + 1 == n_new:
                    break
                h = model.hidden(nxt.view(batch, 1), caches, offset)
                offset += 1
            return torch.stack(new, 1)

    def snapshot():
        with torch.no_grad():
            weights = {"model.embed_tokens.weight": model.embed, "model.norm.weight": model.norm}
            adapter = {}
            for i, layer in enumerate(model.layers):
                for name in ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]:
                    m = getattr(layer, name)
                    path = f"model.layers.{i}.{'mlp' if name in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{name}"
                    weights[f"{path}.weight"] = torch.addmm(m.weight, m.lora_B, m.lora_A, alpha=m.scale)
                    if m.bias is not None:
                        weights[f"{path}.bias"] = m.bias
                    adapter[f"{path}.lora_A"] = m.lora_A.detach().clone()
                    adapter[f"{path}.lora_B"] = m.lora_B.detach().clone()
                weights[f"model.layers.{i}.input_layernorm.weight"] = layer.input_layernorm
                weights[f"model.layers.{i}.post_attention_layernorm.weight"] = layer.post_attention_layernorm
            h = hashlib.sha256()
            for prefix, d in (("w:", weights), ("a:", adapter)):
                for name in sorted(d):
                    t = d[name].detach().contiguous()
                    h.update(f"{prefix}{name}[{','.join(map(str, t.shape))}]".encode())
                    h.update(t.numpy().data)
            for d in (weights, adapter):
                for t in d.values():
                    if not torch.isfinite(t).all():
                        raise ValueError("non-finite weights")
            return h.hexdigest()

    forward_s = [None]
    min_reps = [a.repetitions]

    def estimate(m):
        f = forward_s[0]
        if f is None:
            return 0
        if m == "lora_train_tokens_per_s":
            return 3.5 * f
        if m == "snapshot_ms":
            return n_params * 2e-8
        # as bench/scale.ts: prefill at the batched rate, a decode step >= 64 batched tokens
        b = 8 if m == "generate_b8_tokens_per_s" else 64
        per = f / tokens
        est = per * b * S["genPrompt"] + S["genNew"] * per * max(b, 64) * 1.2
        if b == 64 and gen8_s[0] is not None:
            est = max(est, gen8_s[0] + per * 56 * S["genPrompt"])
        return est

    gen8_s = [None]

    def rest(m):
        # one warm-up and one timed run of every later measurement come before repeats
        return sum(estimate(l) * (2 if l == "snapshot_ms" else 1.125) for l in MEASURES[MEASURES.index(m) + 1 :])

    def measure(m, fn, value, warm):
        est = estimate(m)
        warm_cost = est if m in ("snapshot_ms", "logprobs_tokens_per_s", "lora_train_tokens_per_s") else est / 8
        n = a.repetitions
        while n > 1 and warm_cost + n * est + rest(m) > left():
            n -= 1
        if warm_cost + n * est > left():
            skipped.append(f"{m}: estimated {round(warm_cost + est)} s > {round(left())} s left")
            report()
            return
        try:
            warm()
            best, done = math.inf, 0
            while done < n:
                t = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t)
                done += 1
                if best + rest(m) > left():
                    break
            if m == "logprobs_tokens_per_s":
                forward_s[0] = best
            if m == "generate_b8_tokens_per_s":
                gen8_s[0] = best
            out[f"{p}_{m}"] = round(value(best), 2)
            min_reps[0] = min(min_reps[0], done)
            out[f"{p}_repetitions"] = min_reps[0]
        except Exception as e:  # recorded, the other measurements still run
            errors.append(f"{m}: {type(e).__name__}: {str(e)[:300]}")
        report()

    # warm-ups as bench/scale.ts on WebGPU: full size (logprobs, train: the timed step is a
    # steady-state one, not the first at that batch), a full snapshot, and for generation the
    # same batch with an 8-token prompt and 2 new tokens
    measure("logprobs_tokens_per_s", logprobs, lambda s: tokens / s, logprobs)
    measure("snapshot_ms", snapshot, lambda s: s * 1000, snapshot)
    for b in (8, 64):
        if b == 64:
            measure("lora_train_tokens_per_s", train_step, lambda s: tokens / s, train_step)
        measure(
            f"generate_b{b}_tokens_per_s",
            lambda b=b: generate(b),
            lambda s, b=b: b * S["genNew"] / s,
            lambda b=b: generate(b, 8, 2),
        )
    report()


if __name__ == "__main__":
    main()
