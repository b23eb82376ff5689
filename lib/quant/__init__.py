"""Mixed-precision weights (fp16/bf16, fp8, int8, GPTQ int2/3/4/8) and MoE expert tracking."""
