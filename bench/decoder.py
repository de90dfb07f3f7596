"""Decode speed on SmolLM2-135M-Instruct: our ONNX decoder vs onnxruntime-genai vs PyTorch.

    python -m bench.decoder            (make bench NAME=decoder; needs fetch-default-model)

Rows (128 new tokens, greedy, CPU): batch 1 for ours, genai's ``Generator`` and
transformers (fp32 only), each fp32 and int4; genai's static batch of 8; ours with 8 jobs
arriving 50 ms apart through continuous batching (aggregate tokens/s over the whole run,
arrivals included). Every engine makes exactly 128 tokens: genai and transformers by a
minimum length, ours with ``ignore_eos``. Each engine runs in a fresh process: onnxruntime's
and torch's thread pools slow each other down when they share one.

Time to first token (TTFT) is prompt in -> first token out; decode tok/s is the rest of
the tokens over the rest of the time. Each row is the median of ``REPEAT`` runs after a
warm-up. The bandwidth bound is measured memory bandwidth / weight bytes read per decode
step (every weight once: the tied embedding is read whole by the LM head). Other work on
the machine lowers every number (transformers' most); the results record the load average.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

from bench.common import write_results

NEW_TOKENS = 128
REPEAT = 4
STAGGER_S = 0.05
KV_LENGTH = 512
PROMPTS = [
    "Write a detailed essay about the history of Paris, from the Romans to today.",
    (
        "A train travels 240 km in 3 hours. If it increases its speed by 20 km/h, how long "
        "would the same journey take?"
    ),
    "Write a Python function to calculate the Fibonacci sequence using dynamic programming.",
    "Describe the water cycle in detail for a school textbook.",
    (
        "All cats are mammals. Some mammals are carnivores. Can we conclude that some cats are "
        "carnivores?"
    ),
    "Write a long story about a robot who learns to paint.",
    "Explain how compound interest works, with a worked example of $5000 at 6% for 3 years.",
    "Give a detailed guide to planning a vegetable garden, season by season.",
]


def _messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def _summary(runs: list[tuple[float, float, int]]) -> dict[str, float | int]:
    """Median TTFT, decode tok/s and tokens over runs of (ttft_s, total_s, tokens)."""
    ttft = statistics.median(r[0] for r in runs)
    decode = statistics.median((r[2] - 1) / max(r[1] - r[0], 1e-9) for r in runs)
    return {"ttft_ms": ttft * 1000, "decode_tok_s": decode, "tokens": runs[-1][2]}


# --- memory bandwidth -------------------------------------------------------------------------


def memory_bandwidth_gb_s(mib: int = 512, repeat: int = 5) -> float:
    """Best of ``repeat`` numpy copies (read + write bytes), one thread per core."""
    src = np.ones(mib * 2**20 // 8, dtype=np.float64)
    dst = np.empty_like(src)
    parts = os.cpu_count() or 1
    bounds = np.linspace(0, src.size, parts + 1, dtype=np.int64)

    def copy(i: int) -> None:
        np.copyto(dst[bounds[i] : bounds[i + 1]], src[bounds[i] : bounds[i + 1]])

    best = float("inf")
    for _ in range(repeat):
        threads = [threading.Thread(target=copy, args=(i,)) for i in range(parts)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best / 1e9


def weight_bytes(folder: Path) -> int:
    """Bytes of the model's weights (the .onnx file and its external data)."""
    return sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith("model.onnx"))


# --- onnxruntime-genai ------------------------------------------------------------------------


class Genai:
    def __init__(self, folder: Path) -> None:
        import onnxruntime_genai as og
        from transformers import AutoTokenizer

        self.og, self.model = og, og.Model(str(folder))
        self.tokenizer = AutoTokenizer.from_pretrained(folder)

    def ids(self, prompt: str) -> list[int]:
        return self.tokenizer.apply_chat_template(
            _messages(prompt), add_generation_prompt=True, return_dict=True
        )["input_ids"]

    def run(self, prompts: list[str], new_tokens: int = NEW_TOKENS) -> tuple[float, float, int]:
        """One static batch; (ttft_s, total_s, tokens generated over all sequences)."""
        og = self.og
        rows = [self.ids(p) for p in prompts]
        width = max(map(len, rows))
        pad = self.tokenizer.pad_token_id
        batch = np.array([[pad] * (width - len(r)) + r for r in rows], dtype=np.int32)
        params = og.GeneratorParams(self.model)
        length = width + new_tokens
        params.set_search_options(
            max_length=length, min_length=length, do_sample=False, batch_size=len(prompts)
        )
        start = time.perf_counter()
        generator = og.Generator(self.model, params)
        generator.append_tokens(batch)
        generator.generate_next_token()
        generator.get_next_tokens()
        ttft = time.perf_counter() - start
        steps = 1
        while not generator.is_done():
            generator.generate_next_token()
            generator.get_next_tokens()
            steps += 1
        return ttft, time.perf_counter() - start, steps * len(prompts)


# --- transformers (PyTorch) -------------------------------------------------------------------


class Transformers:
    def __init__(self, folder: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(os.cpu_count() or 1)
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    def run(self, prompt: str, new_tokens: int = NEW_TOKENS) -> tuple[float, float, int]:
        stamps: list[float] = []

        class Clock:  # a streamer: put() is called with the prompt, then with each token
            def put(self, value) -> None:
                stamps.append(time.perf_counter())

            def end(self) -> None:
                pass

        ids = self.tokenizer.apply_chat_template(
            _messages(prompt), add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        start = time.perf_counter()
        with self.torch.no_grad():
            self.model.generate(
                **ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, streamer=Clock(),
            )  # fmt: skip
        tokens = len(stamps) - 1
        return stamps[1] - start, stamps[-1] - start, tokens


# --- ours -------------------------------------------------------------------------------------


class Ours:
    """Our decoder through ``runtimes.onnx.OnnxRuntime`` (``ignore_eos``: always 128 tokens)."""

    def __init__(self, folder: Path) -> None:
        from runtimes.onnx import OnnxRuntime

        # KV length as genai's (prompt + 128 fits); the worker default is 4096
        self.runtime = OnnxRuntime(folder, max_batch=len(PROMPTS), max_length=KV_LENGTH)
        self.runtime.load()

    def ids(self, prompt: str) -> list[int]:
        return self.runtime.encode_chat(_messages(prompt))

    def run(self, prompt: str) -> tuple[float, float, int]:
        ids = self.ids(prompt)
        start = time.perf_counter()
        result = self.runtime.generate_ids(ids, NEW_TOKENS, ignore_eos=True)
        total = time.perf_counter() - start
        return result.time_to_first_token_s, total, len(result.token_ids)

    def concurrent(self, prompts: list[str]) -> tuple[float, float, int]:
        """Jobs arriving ``STAGGER_S`` apart; (median ttft_s, wall_s, tokens of all jobs)."""
        ids = [self.ids(p) for p in prompts]
        start = time.perf_counter()
        jobs = []
        for i, row in enumerate(ids):
            time.sleep(max(0.0, start + i * STAGGER_S - time.perf_counter()))
            jobs.append(self.runtime.submit_ids(row, max_new_tokens=NEW_TOKENS, ignore_eos=True))
        results = [job.future.result() for job in jobs]
        wall = time.perf_counter() - start
        ttft = statistics.median(r.time_to_first_token_s for r in results)
        return ttft, wall, sum(len(r.token_ids) for r in results)

    def close(self) -> None:
        self.runtime.close()


# --- the run: one process per engine, rounds interleaved -------------------------------------
#
# onnxruntime's and torch's thread pools slow each other down in one process, so each engine
# lives in its own. The engines take turns, one run each per round, so load from elsewhere
# on the machine falls on all of them alike; the ratios are medians of per-round ratios.


def _serve(engine: str, precision: str, folder: Path, conn) -> None:
    """Engine process: answer ("b1" | "b8") with one run's (ttft_s, total_s, tokens)."""
    try:
        prompt, n = PROMPTS[0], len(PROMPTS)
        if engine == "transformers":
            hf = Transformers(folder)
            runs = {"b1": lambda: hf.run(prompt)}
        elif engine == "genai":
            genai = Genai(folder)
            runs = {"b1": lambda: genai.run([prompt]), "b8": lambda: genai.run([prompt] * n)}
        else:
            ours = Ours(folder)
            runs = {"b1": lambda: ours.run(prompt), "b8": lambda: ours.concurrent(PROMPTS)}
        for run in runs.values():
            run()  # warm-up
        conn.send(("ready", sorted(runs)))
        while (command := conn.recv()) != "stop":
            conn.send(("ok", runs[command]()))
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which goes on
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


class EngineProcess:
    def __init__(self, engine: str, precision: str, folder: Path) -> None:
        context = multiprocessing.get_context("spawn")
        self.name = f"{engine} {precision}"
        self.conn, child = context.Pipe()
        self.process = context.Process(
            target=_serve, args=(engine, precision, folder, child), daemon=True
        )
        self.process.start()
        status, self.kinds = self.conn.recv()  # loaded and warm (one at a time: no contention)
        if status == "error":
            self.close()
            raise RuntimeError(self.kinds)

    def run(self, kind: str) -> tuple[float, float, int]:
        self.conn.send(kind)
        status, value = self.conn.recv()
        if status == "error":
            raise RuntimeError(value)
        return value

    def close(self) -> None:
        if self.process.is_alive():
            try:
                self.conn.send("stop")
            except OSError:
                pass
            self.process.join(30)


def _row(engine: str, precision: str, kind: str, runs: list[tuple[float, float, int]]) -> dict:
    row = {"engine": engine, "precision": precision}
    if kind == "b1":
        return {**row, "batch": 1, **_summary(runs)}
    return {
        **row, "batch": f"{len(PROMPTS)} staggered" if engine == "ours" else len(PROMPTS),
        "ttft_ms": statistics.median(r[0] for r in runs) * 1000,
        "aggregate_tok_s": statistics.median(r[2] / r[1] for r in runs),
        "tokens": runs[-1][2],
    }  # fmt: skip


def _rate(kind: str, run: tuple[float, float, int]) -> float:
    """Decode tok/s of a batch-1 run, aggregate tok/s of a batch run."""
    return (run[2] - 1) / max(run[1] - run[0], 1e-9) if kind == "b1" else run[2] / run[1]


def main(argv: list[str] | None = None) -> int:
    from runtimes.onnx.default_model import model_dir

    folders = {v: model_dir(v) for v in ("hf", "fp32", "int4")}
    missing = [str(f) for f in folders.values() if not (f / ".reasonq-complete").is_file()]
    if missing:
        print(f"missing {missing}: run `reasonq fetch-default-model --precision int4`")
        return 1
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    bandwidth = memory_bandwidth_gb_s()
    print(f"memory bandwidth (numpy copy): {bandwidth:.1f} GB/s", flush=True)
    engines: dict[tuple[str, str], EngineProcess] = {}
    errors: dict[str, str] = {}
    for engine, precision in [("transformers", "fp32"), ("genai", "fp32"), ("genai", "int4"),
                              ("ours", "fp32"), ("ours", "int4")]:  # fmt: skip
        folder = folders["hf" if engine == "transformers" else precision]
        try:
            engines[engine, precision] = EngineProcess(engine, precision, folder)
        except Exception as exc:  # noqa: BLE001 - one engine failing must not lose the others
            errors[f"{engine} {precision}"] = str(exc)
            print(f"{engine} {precision} failed: {exc}", file=sys.stderr, flush=True)
    print(f"loaded and warmed up: {', '.join(p.name for p in engines.values())}", flush=True)

    runs: dict[tuple[str, str, str], list] = {}
    try:
        for round_ in range(REPEAT):
            for kind in ("b1", "b8"):
                for key, proc in list(engines.items()):
                    if kind not in proc.kinds:
                        continue
                    try:
                        runs.setdefault((*key, kind), []).append(proc.run(kind))
                    except RuntimeError as exc:
                        errors[proc.name] = str(exc)
                        proc.close()
                        del engines[key]
            print(f"round {round_ + 1}/{REPEAT} done", flush=True)
    finally:
        for proc in engines.values():
            proc.close()
    rows = [_row(engine, precision, kind, got) for (engine, precision, kind), got in runs.items()]
    rows.sort(key=lambda r: (r["batch"] != 1, r["engine"] != "transformers", r["engine"]))

    for row in rows:
        if row["batch"] == 1:
            bound = bandwidth * 1e9 / weight_bytes(folders[row["precision"]])
            row["bound_tok_s"] = bound
            row["of_bound"] = row["decode_tok_s"] / bound

    per_round: dict[str, list[float]] = {}

    def ratio(a: tuple[str, str, str], b: tuple[str, str, str]) -> float | None:
        """Median over rounds of (a's rate / b's rate) in the same round."""
        if a not in runs or b not in runs:
            return None
        pairs = zip(runs[a], runs[b], strict=False)
        values = [round(_rate(a[2], x) / _rate(b[2], y), 3) for x, y in pairs]
        per_round[f"{' '.join(a)} / {' '.join(b)}"] = values  # the spread shows the noise
        return statistics.median(values)

    ratios = {
        "batch1_vs_genai_fp32": ratio(("ours", "fp32", "b1"), ("genai", "fp32", "b1")),
        "batch1_vs_genai_int4": ratio(("ours", "int4", "b1"), ("genai", "int4", "b1")),
        "concurrent8_vs_genai_batch8": ratio(("ours", "fp32", "b8"), ("genai", "fp32", "b8")),
        "concurrent8_vs_genai_batch8_int4": ratio(("ours", "int4", "b8"), ("genai", "int4", "b8")),
        "genai_fp32_vs_transformers": ratio(
            ("genai", "fp32", "b1"), ("transformers", "fp32", "b1")
        ),
    }
    extra = {
        "model": "SmolLM2-135M-Instruct",
        "new_tokens": NEW_TOKENS,
        "repeat": REPEAT,
        "stagger_s": STAGGER_S,
        "memory_bandwidth_gb_s": round(bandwidth, 2),
        "weight_bytes": {p: weight_bytes(folders[p]) for p in ("fp32", "int4")},
        "loadavg_1m_at_start": round(load_at_start, 2),
        "ratios_per_round": per_round,
        "errors": errors,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(f"memory bandwidth {bandwidth:.1f} GB/s; weight bytes per decode step: "
          + ", ".join(f"{p} {b / 1e6:.0f} MB" for p, b in extra["weight_bytes"].items())
          + " (bound_tok_s = bandwidth / weight bytes; of_bound = decode_tok_s / bound)")  # fmt: skip
    write_results("decoder", rows, ratios, extra)
    print(f"benchmark took {extra['seconds']:.0f} s")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
