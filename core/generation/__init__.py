"""Generation serving over the decoder base: continuously batched, many LoRA adapters at once.

One module per idea: ``kv`` (the per-slot KV cache and its memory budget), ``decode`` (one
decode step over sequences of different lengths), ``sampling`` (greedy, temperature, top-p,
seeds, logprobs), ``detok`` (incremental detokenization and stop strings), ``adapters`` (the
stacked LoRA bank with pins) and ``scheduler`` (admission, prefill, decode and retirement,
owned by one thread).
"""
