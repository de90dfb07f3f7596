"""Every setting of reasonq, read once from ``REASONQ_*`` environment variables.

The API, the workers and the scripts share this one module; nothing else reads
``os.environ``. Each field's description is its documentation: the README's table is
written from it by ``python -m scripts.settings_table --write README.md``.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

RuntimeName = Literal["vllm", "ollama", "onnx"]

_DEFAULT_DATA_DIR = Path.home() / ".local" / "share" / "reasonq"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="REASONQ_", extra="ignore")

    # --- connections -------------------------------------------------------------------
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis holding the queues, job state, events and API keys.",
    )
    redis_timeout_s: float = Field(
        5.0,
        gt=0,
        description="Seconds the API or a worker waits on one Redis command: the API then "
        "answers 503, a worker retries on a new connection. A hung Redis never hangs a request, "
        "and a connection that died without a word never hangs a job.",
    )

    # --- routing -----------------------------------------------------------------------
    runtime_queues: dict[str, str] = Field(
        {"onnx": "cpu", "ollama": "cpu", "vllm": "gpu"},
        description="JSON map runtime -> queue. A runtime absent here is refused with 422; "
        "/readyz requires a consumer on every queue named here.",
    )
    default_runtime: RuntimeName = Field("onnx", description="Runtime of a job that names none.")
    profiles_file: Path = Field(
        Path(__file__).resolve().parent.parent / "config" / "profiles.toml",
        description="Task profiles (system prompt, default sampling) per task type.",
    )

    # --- job lifecycle -----------------------------------------------------------------
    result_ttl_s: int = Field(7 * 24 * 3600, description="Seconds a finished job stays readable.")
    batch_priority: int = Field(
        3,
        ge=0,
        le=9,
        description="Priority (0-9) of batch rows that set none: below interactive jobs' 5, "
        "so a large batch does not starve them.",
    )
    job_deadline_s: float = Field(
        600.0, description="A job running longer than this is failed (code deadline_exceeded)."
    )
    max_attempts: int = Field(
        3,
        description="Deliveries of one job before it is failed as poison "
        "(its worker died each time).",
    )
    visibility_timeout_s: int = Field(
        30,
        description="Seconds before a job whose worker vanished is redelivered. Live workers "
        "renew their jobs' leases, so this bounds redelivery, not job length.",
    )
    restore_interval_s: int = Field(
        5, description="Seconds between the broker's sweeps for expired leases."
    )

    # --- workers -----------------------------------------------------------------------
    worker_concurrency: int = Field(
        64, description="Jobs one worker process runs at once (HTTP generations in flight)."
    )
    backend_max_inflight: int = Field(
        256,
        description="Generations in flight per backend, shared by all workers (Redis semaphore).",
    )
    control_interval_s: float = Field(
        0.05,
        description="How often a worker publishes the new tokens of jobs someone watches.",
    )
    control_poll_s: float = Field(
        1.0,
        description="How often a worker polls its running jobs' cancel flags and watchers (one "
        "Redis round trip for all). A safety net: the API also nudges workers over pub/sub.",
    )
    retry_max_attempts: int = Field(
        6, description="Tries of one backend call (connection error, timeout, 429, 5xx)."
    )
    retry_backoff_s: float = Field(0.5, description="First retry delay; doubles each try.")
    retry_backoff_max_s: float = Field(20.0, description="Cap on one retry delay.")

    # --- HTTP runtimes -----------------------------------------------------------------
    vllm_url: str = Field("http://127.0.0.1:8001", description="vLLM OpenAI-compatible server.")
    vllm_api_key: str | None = Field(None, description="Bearer token for vLLM, if it needs one.")
    vllm_model: str | None = Field(
        None, description="Model for vLLM jobs naming none; unset = first of /v1/models."
    )
    ollama_url: str = Field("http://127.0.0.1:11434", description="Ollama server.")
    ollama_model: str = Field("phi4-mini", description="Model for Ollama jobs naming none.")
    ollama_keep_alive: str = Field("5m", description="Ollama keep_alive sent with each request.")
    ollama_num_ctx: int = Field(4096, description="Ollama num_ctx (context window) option.")
    http_connect_timeout_s: float = Field(5.0, description="Backend connect timeout.")
    http_read_timeout_s: float = Field(
        120.0, description="Longest silence between two chunks of a backend response."
    )
    http_keepalive_expiry_s: float = Field(
        4.0,
        description="Idle pooled connections are dropped after this; keep it below the "
        "backend's own idle timeout (uvicorn: 5 s).",
    )
    http_cancel_poll_s: float = Field(
        0.25,
        description="While a backend sends nothing (request queued, model loading), how often "
        "a streaming generation checks whether its job was cancelled.",
    )

    # --- ONNX runtime ------------------------------------------------------------------
    data_dir: Path = Field(
        _DEFAULT_DATA_DIR, description="Downloaded and converted models live here."
    )
    onnx_model: str = Field(
        "smollm2-135m-instruct-fp32",
        description="ONNX model folder: a path, or a name under <data_dir>/models.",
    )
    onnx_provider: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto = CUDA when onnxruntime-gpu sees a GPU, else CPU."
    )
    onnx_intra_op_threads: int = Field(0, description="onnxruntime intra-op threads (0 = cores).")
    onnx_inter_op_threads: int = Field(1, description="onnxruntime inter-op threads.")
    onnx_thread_spinning: bool = Field(
        True,
        description="Let onnxruntime threads spin-wait between ops (its default): int4 decode "
        "~1.3x faster on cores the worker has to itself, ~2x slower when other busy processes "
        "share them; set false on crowded hosts.",
    )
    onnx_max_batch: int = Field(
        8, description="Sequences decoded together in one worker (continuous batching)."
    )
    onnx_max_length: int = Field(
        4096, description="KV-cache length per sequence (prompt + new tokens)."
    )
    onnx_prefill_chunk: int = Field(
        512,
        description="Prompt tokens per prefill forward pass (bounds the prompt logits' memory).",
    )

    # --- API ---------------------------------------------------------------------------
    api_host: str = Field("127.0.0.1", description="Where `make run` binds the API.")
    api_port: int = Field(8000, description="API port.")
    flower_port: int = Field(5555, description="Where `make run` serves Flower (loopback).")
    public_url: str | None = Field(
        None, description="Base URL put in job links; unset = the request's own base URL."
    )
    max_body_bytes: int = Field(
        1_000_000, description="Largest request body accepted (413 beyond), uploads aside."
    )
    max_upload_bytes: int = Field(
        100_000_000,
        description="Largest multipart/form-data body accepted (batch file uploads; 413 beyond).",
    )
    max_prompt_chars: int = Field(200_000, description="Longest prompt accepted.")
    max_tokens_limit: int = Field(32_768, description="Largest max_tokens a job may ask for.")
    auth_enabled: bool = Field(
        False, description="Require `Authorization: Bearer <key>` (keys: `reasonq keys create`)."
    )
    client_api_key: str | None = Field(
        None, description="Bearer key `reasonq-submit` sends (its --api-key overrides)."
    )

    # --- webhooks and event streams ----------------------------------------------------
    webhook_secret: SecretStr | None = Field(
        None,
        description="Key signing webhook deliveries with HMAC-SHA256 (docs/webhooks.md). "
        "Unset: jobs with a callback_url are refused.",
    )
    webhook_allow_hosts: list[str] = Field(
        [],
        description="JSON list of host names, IPs or CIDRs a callback_url may reach although "
        'they are not public (private, loopback, link-local), e.g. ["10.0.0.0/8"].',
    )
    webhook_max_attempts: int = Field(
        10, description="Tries of one webhook delivery (non-2xx or no answer) before giving up."
    )
    webhook_backoff_s: float = Field(5.0, description="First webhook retry delay; doubles each try.")
    webhook_backoff_max_s: float = Field(900.0, description="Cap on one webhook retry delay.")
    webhook_timeout_s: float = Field(
        10.0, description="Longest one webhook attempt may take (DNS, connect, response)."
    )
    webhook_poll_interval_s: float = Field(
        0.5, description="How often each worker looks for webhook deliveries that are due."
    )
    webhook_concurrency: int = Field(16, description="Webhook POSTs in flight per worker process.")
    sse_keepalive_s: float = Field(
        15.0, description="Comment line sent on an idle event stream, so proxies keep it open."
    )

    # --- observability -----------------------------------------------------------------
    worker_metrics_port: int = Field(
        9101, description="Prometheus port of a worker process (0 = no metrics server)."
    )
    flower_show_content: bool = Field(
        False, description="Show prompts and answers in Flower task args (off: ids and sizes)."
    )

    @cached_property
    def queues(self) -> list[str]:
        """Every queue some runtime is routed to, in a stable order."""
        return sorted(set(self.runtime_queues.values()))

    def onnx_model_path(self) -> Path:
        path = Path(self.onnx_model).expanduser()
        return path if path.is_absolute() or path.exists() else self.data_dir / "models" / path


settings = Settings()
