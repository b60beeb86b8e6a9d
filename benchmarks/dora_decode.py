"""DoRA decoding cost: ours (norm cached while the weights do not change) vs PEFT, CPU mode shape.

    python benchmarks/dora_decode.py      # greedy, batch 1, 16 new tokens after 16 prompt tokens, 1 thread
"""
import sys, time, torch
sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.abspath(__file__)))
torch.set_num_threads(1)
import bench, moelora, peft
shape = bench.shape_for("cpu", False)
def timeit(model):
    ids = torch.randint(3, 8000, (1, 16))
    kw = dict(do_sample=False, max_new_tokens=16, min_new_tokens=16, pad_token_id=0, attention_mask=torch.ones_like(ids))
    with torch.inference_mode():
        model.generate(input_ids=ids, **kw)
        t0 = time.perf_counter(); model.generate(input_ids=ids, **kw); return (time.perf_counter() - t0) / 16 * 1e3
base = bench.build_base(shape)
print("base ms/token", round(timeit(base), 2))
moelora.attach(base, moelora.LoraConfig(r=16, lora_alpha=32, use_dora=True, target_modules=bench.TARGETS)); base.eval()
print("ours DoRA ms/token", round(timeit(base), 2))
for m in base.modules(): m.__dict__.pop("_norm_cache", None)
import moelora.lora as L
orig = L.DoraVariant._norm
L.DoraVariant._norm = lambda self, b, l: self._weight_norm(b.weight, l)
print("ours DoRA without the norm cache ms/token", round(timeit(base), 2))
L.DoraVariant._norm = orig
moelora.detach(base)
p = peft.get_peft_model(base, peft.LoraConfig(r=16, lora_alpha=32, use_dora=True, target_modules=bench.TARGETS)).eval()
print("PEFT DoRA ms/token", round(timeit(p), 2))
