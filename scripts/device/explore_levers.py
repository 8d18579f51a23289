"""Exploratory lever timing on one H200 (not the benchmark of record): one 2B-shape model, reconfigured per variant."""
import json, os, sys, time, statistics, torch
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
from transformers import Gemma2Config, Gemma2ForCausalLM, AutoModelForCausalLM, BitsAndBytesConfig
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
import bitsandbytes as bnb
from liger_kernel.transformers import apply_liger_kernel_to_gemma2
t00 = time.time()
path = "/tmp/gemma2-2b"
if not os.path.exists(path + "/config.json"):
    cfg = Gemma2Config(vocab_size=256000, max_position_embeddings=8192, hidden_size=2304, intermediate_size=9216,
                       num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256)
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = Gemma2ForCausalLM(cfg).to(torch.bfloat16)
    m.save_pretrained(path); del m; torch.cuda.empty_cache()
print("made model", round(time.time() - t00), flush=True)
apply_liger_kernel_to_gemma2(rope=True, rms_norm=True, geglu=True, fused_linear_cross_entropy=True, cross_entropy=False)
q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
t = time.time()
m = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=torch.bfloat16, attn_implementation="eager", device_map={"": 0})
m.config.use_cache = False
m = prepare_model_for_kbit_training(m, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
torch.manual_seed(0)
m = get_peft_model(m, LoraConfig(r=32, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
print("loaded", round(time.time() - t), flush=True)
params = [p for p in m.parameters() if p.requires_grad]
init = [p.detach().clone() for p in params]
fp32_state = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad and p.dtype == torch.float32}
print("fp32 frozen params:", len(fp32_state), sum(v.numel() for v in fp32_state.values()), flush=True)
SEQ = 2048
def run(name, attn, ckpt, mb, bf16_rest, steps=3):
    with torch.no_grad():
        for p, v in zip(params, init): p.copy_(v)
        for n, p in m.named_parameters():
            if n in fp32_state: p.data = (fp32_state[n].to(torch.bfloat16) if bf16_rest else fp32_state[n])
    m.base_model.model.set_attn_implementation(attn)
    if ckpt: m.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else: m.base_model.model.gradient_checkpointing_disable()
    m.train()
    opt = bnb.optim.PagedAdamW8bit(params, lr=2e-4)
    g = torch.Generator(device="cuda").manual_seed(0)
    accum = 16 // mb
    torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    def step():
        tot = 0.0
        for _ in range(accum):
            ids = torch.randint(0, 256000, (mb, SEQ), device="cuda", generator=g)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = m(input_ids=ids, labels=ids).loss / accum
            loss.backward(); tot += float(loss)
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step(); opt.zero_grad(set_to_none=True)
        return tot
    try:
        t = time.time(); first = step(); torch.cuda.synchronize(); warm = time.time() - t
        ts = []
        for _ in range(steps):
            t = time.perf_counter(); last = step(); torch.cuda.synchronize(); ts.append(time.perf_counter() - t)
        r = dict(name=name, attn=attn, ckpt=ckpt, mb=mb, bf16_rest=bf16_rest, tok_s=round(16 * SEQ / statistics.median(ts)),
                 peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2), first_loss=round(first, 5), last_loss=round(last, 5), warm_s=round(warm, 1))
    except Exception as e:
        r = dict(name=name, error=f"{type(e).__name__}: {str(e)[:300]}")
    del opt; torch.cuda.empty_cache()
    print("RESULT", json.dumps(r), flush=True)
for spec in [("eager-ckpt-mb4", "eager", True, 4, False), ("eager-nockpt-mb8", "eager", False, 8, False),
             ("flex-nockpt-mb8", "flex_attention", False, 8, False), ("flex-nockpt-mb8-bf16", "flex_attention", False, 8, True),
             ("eager-nockpt-mb8-bf16", "eager", False, 8, True), ("flex-nockpt-mb16-bf16", "flex_attention", False, 16, True),
             ("flex-ckpt-mb16-bf16", "flex_attention", True, 16, True), ("sdpa-nockpt-mb8-bf16(inexact)", "sdpa", False, 8, True)]:
    run(*spec)
print("total", round(time.time() - t00), flush=True)
