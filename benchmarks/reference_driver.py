"""Drive the paper's own implementation (PyPI ``codebook-features`` 0.1.2) for bench_reference.py.

Runs under ``.venv-ref/bin/python`` (``make venv-ref``), never in the project's venv: the
reference needs transformers 4.34. It imports only the reference package, torch and
``common.py`` (stdlib + torch), never ``codebook_lens``. It reads one JSON command per line on
stdin and answers each with one line ``@@ {json}`` on stdout (other output is ignored).
Every command may carry a ``"name"`` (default ``"main"``): several benchmarks can be built and
run in turn.

- ``{"op": "layer", "tokens", "groups", "head_dim", "num_codes", "k"}``: build a codebook layer
  (``CodebookLayer`` for one group, ``GroupCodebookLayer`` otherwise) with the reference's
  inner-product snap function (ranking by ``x.c/|c|``, i.e. cosine), its input LayerNorm and
  ``aeloss`` (reconstruction gradient to the codes), logging off (its fastest setting, the
  default inside its ``CodebookModel``). One run = forward + backward of a fixed output gradient.
- ``{"op": "train", "layers", "width", "heads", "mlp", "vocab", "batch", "seq",
  "codebook_at": [...], "num_codes", "k"}``: a GPT-NeoX ``GPTNeoXCodebookModel`` (or the bare
  model when ``codebook_at`` is empty); one run = forward with labels, backward, AdamW step.
- ``{"op": "run"}``: one timed run -> ``{"wall": s, "cpu": s}``.
- ``{"op": "memory"}``: peak tensor bytes of one run (``common.peak_extra_bytes``).
- ``{"op": "drop"}``: forget a built benchmark (frees its memory).
- ``{"op": "quit"}``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import peak_extra_bytes  # noqa: E402


def build_layer(spec: dict[str, Any]) -> Callable[[], None]:
    from codebook_features import models as cf

    n, g, d = spec["tokens"], spec["groups"], spec["head_dim"]
    c, k = spec["num_codes"], spec["k"]
    cf.BaseSnapFunction.loss = "aeloss"
    torch.manual_seed(0)
    layer: Any
    if g == 1:
        layer = cf.CodebookLayer(
            dim=d, num_codes=c, key="bench", snap_fn=cf.InnerProductSnapFunction, kcodes=k
        )
    else:
        layer = cf.GroupCodebookLayer(
            dim=g * d,
            num_codes=c,
            key="bench",
            num_codebooks=g,
            snap_fn=cf.InnerProductSnapFunction,
            kcodes=k,
        )
    layer.disable_logging()
    layer.train()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, n, g * d, generator=gen).requires_grad_(True)
    grad = torch.randn(1, n, g * d, generator=gen)
    params = list(layer.parameters())

    def run() -> None:
        x.grad = None
        for p in params:
            p.grad = None
        layer(x).backward(grad)

    return run


def build_train(spec: dict[str, Any]) -> Callable[[], None]:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(
        vocab_size=spec["vocab"],
        hidden_size=spec["width"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        intermediate_size=spec["mlp"],
        max_position_embeddings=max(spec["seq"], 8),
    )
    model: Any = GPTNeoXForCausalLM(cfg)
    at = list(spec["codebook_at"])
    if at:
        from codebook_features import models as cf

        kinds = {"attn_preproj": ("group", -1), "mlp": ("vanilla", 1)}
        ccfg = cf.CodebookModelConfig(
            codebook_at=at,
            codebook_type=[kinds[a][0] for a in at],
            num_codebooks=[kinds[a][1] for a in at],
            k_codebook=spec["k"],
            num_codes=spec["num_codes"],
            layers_to_snap="all",
            similarity_metric="inner_product",
            loss="aeloss",
        )
        model = cf.GPTNeoXCodebookModel(ccfg, model)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec["vocab"], (spec["batch"], spec["seq"]), generator=gen)

    def run() -> None:
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run


def answer(data: dict[str, Any]) -> None:
    sys.stdout.write("@@ " + json.dumps(data) + "\n")
    sys.stdout.flush()


def main() -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    runs: dict[str, Callable[[], None]] = {}
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        op = cmd.pop("op")
        name = cmd.pop("name", "main")
        try:
            if op == "quit":
                answer({"ok": True})
                return
            if op == "layer":
                runs[name] = build_layer(cmd)
                answer({"ok": True})
            elif op == "train":
                runs[name] = build_train(cmd)
                answer({"ok": True})
            elif op == "run":
                run = runs[name]
                c0, t0 = time.process_time(), time.perf_counter()
                run()
                answer({"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0})
            elif op == "memory":
                answer({"peak_bytes": peak_extra_bytes(runs[name])})
            elif op == "drop":
                runs.pop(name, None)
                answer({"ok": True})
            else:
                answer({"error": f"unknown op {op!r}"})
        except Exception as e:  # reported to the parent, which fails loudly
            answer({"error": f"{type(e).__name__}: {e}"})


if __name__ == "__main__":
    main()
