"""Oracle bounds for carving SmolLM2-135M's FFNs: how much perplexity is lost at a given fraction of
active neurons with a *perfect* (non-causal) router, for neuron-level selection and for expert groups
made by several neuron-clustering features. Usage:

    python benchmarks/cmoe_partition_probe.py neuron:0.75 neuron:0.5 6,2,4,top100 6,2,4,contrib 184,8,136,contrib,norm

``E,S,K,feature[,select]``: E routed + S shared experts (shared = highest mean feature), the K routed
experts with the largest gain ``2 y_e.R - |y_e|^2`` against the dense output run (``select`` = ``gain``,
the default) or with the largest outputs ``|y_e|^2`` (``norm``); features: ``topN`` (CMoE markers, N
neurons per token), ``contrib`` (|h| x |W_down column|, token-normalised), ``contribn``.
``neuron:F``: every token keeps its top fraction F of neurons by |h| (no experts).
Text: gensim's Wikipedia sample, 8 x 512 calibration / 8 x 512 held-out tokens.
"""
import sys, time, torch, types
sys.path.insert(0, "/work/main/benchmarks")
import cmoe_probe as P
from hookmoe.cmoe import balanced_kmeans
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.set_num_threads(2)
d, name = P.smollm2_location()
tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
m = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
arts = P.wiki_articles()
calib = P.make_blocks(tok, arts[:80], 8, 512)
held = P.make_blocks(tok, arts[80:100], 8, 512)
layers = m.model.layers
# profile
H = [[] for _ in layers]
def mk(i):
    def hook(mod, args):
        x = args[0].reshape(-1, args[0].shape[-1])
        H[i].append((mod.act_fn(mod.gate_proj(x)) * mod.up_proj(x)).detach())
    return hook
hs = [L.mlp.register_forward_pre_hook(mk(i)) for i, L in enumerate(layers)]
with torch.no_grad():
    for s in range(0, 8, 4): m(input_ids=calib[s:s+4], use_cache=False)
for h in hs: h.remove()
H = [torch.cat(h)[::2] for h in H]  # 2048 tokens
print("profiled", H[0].shape, flush=True)
orig = [L.mlp.forward for L in layers]
def set_oracle(parts, shared, K, select="gain"):
    for i, L in enumerate(layers):
        mlp = L.mlp
        g = parts[i]  # [E, size] neuron ids
        sh = shared[i]
        def fwd(self, x, g=g, sh=sh, K=K, select=select):
            h = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
            full = self.down_proj(h)
            shp = x.shape
            hf = h.reshape(-1, h.shape[-1])
            ys = torch.einsum("nei,hei->neh", hf[:, g], self.down_proj.weight[:, g])  # [N,E,H]
            shared_out = hf[:, sh] @ self.down_proj.weight[:, sh].T if len(sh) else 0
            R = full.reshape(-1, full.shape[-1]) - shared_out
            if select == "norm":  # drop the experts with the smallest outputs
                gain = (ys * ys).sum(-1)
            else:
                gain = 2 * (ys * R[:, None]).sum(-1) - (ys * ys).sum(-1)
            idx = gain.topk(K, dim=-1).indices
            out = ys.gather(1, idx[:, :, None].expand(-1, -1, ys.shape[-1])).sum(1) + shared_out
            return out.reshape(shp[:-1] + (out.shape[-1],))
        mlp.forward = types.MethodType(fwd, mlp)
def partition(i, E, S, feat, seed=0):
    h = H[i]; n = h.shape[1]; size = n // (E + S)
    wd = layers[i].mlp.down_proj.weight.detach().norm(dim=0)
    c = h.abs() * wd
    if feat.startswith("top"):
        ka = int(feat[3:]); f = torch.zeros_like(h); f.scatter_(1, h.abs().topk(ka, dim=-1).indices, 1.0)
    elif feat == "contrib":
        f = c / c.norm(dim=1, keepdim=True)
    elif feat == "contribn":
        f = c / c.norm(dim=1, keepdim=True); f = f / f.norm(dim=0, keepdim=True).clamp_min(1e-9)
    rate = c.mean(0) if feat.startswith("contrib") else f.mean(0)
    order = torch.argsort(rate, descending=True)
    shared = order[: S*size]; pool = torch.sort(order[S*size:]).values
    v = f[:, pool].T.contiguous()
    gen = torch.Generator().manual_seed(seed)
    labels, _, _, _ = balanced_kmeans(v, E, size, 10, gen)
    g = torch.stack([pool[labels == e] for e in range(E)])
    return g, shared
def set_neuron_oracle(frac):
    for L in layers:
        def fwd(self, x, frac=frac):
            h = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
            thr = h.abs().topk(int(h.shape[-1] * frac), dim=-1).values[..., -1:]
            return self.down_proj(h * (h.abs() >= thr))
        L.mlp.forward = types.MethodType(fwd, L.mlp)
print(f"dense ppl {P.perplexity(m, held):.3f}", flush=True)
for arg in sys.argv[1:]:
    if arg.startswith("neuron:"):
        set_neuron_oracle(float(arg[7:]))
        print(f"{arg}: per-token top neurons by |h|, ppl {P.perplexity(m, held):.3f}", flush=True)
        continue
    E, S, K, feat, *sel = arg.split(","); E, S, K = int(E), int(S), int(K)
    select = sel[0] if sel else "gain"
    t = time.time()
    parts, shared = zip(*[partition(i, E, S, feat) for i in range(len(layers))])
    tc = time.time() - t
    set_oracle(parts, shared, K, select)
    print(f"E{E}S{S}K{K} {feat} {select}: oracle ppl {P.perplexity(m, held):.3f} (cluster {tc:.1f}s)", flush=True)
