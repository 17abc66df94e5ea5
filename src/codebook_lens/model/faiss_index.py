"""FAISS indexes for ``CodebookLayer.build_index``: one per group, rebuilt when the codes change.

``faiss`` is imported only when an index is built (``pip install faiss-cpu``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

IndexVectors = Callable[[], tuple[Tensor, bool]]
"""Returns the vectors to index ``(groups, num_codes, d)`` (fp32) and whether to rank by L2
distance (``True``) rather than by inner product."""


class FaissIndex:
    """FAISS indexes (one per group) mirroring a layer's scoring; see ``CodebookLayer.build_index``.

    ``nlist=0``: exact flat indexes; ``nlist > 0``: IVF indexes with ``nlist`` cells, ``nprobe``
    probed per query.
    """

    def __init__(self, nlist: int, nprobe: int) -> None:
        try:
            import faiss  # type: ignore[import-not-found]
        except ImportError as e:
            raise ImportError(
                "build_index needs FAISS: pip install faiss-cpu (or codebook-lens[faiss])"
            ) from e
        self.faiss: Any = faiss
        self.nlist, self.nprobe = nlist, nprobe
        self.version = -1
        self.indexes: list[Any] = []

    def refresh(self, version: int, vectors: IndexVectors) -> None:
        """(Re)build from ``vectors()`` unless the codes' ``version`` is the one indexed."""
        if version == self.version:
            return
        faiss = self.faiss
        w, l2 = vectors()
        metric = faiss.METRIC_L2 if l2 else faiss.METRIC_INNER_PRODUCT
        d = w.shape[-1]
        self.indexes = []
        for vecs in w.cpu().contiguous().numpy():
            if self.nlist:
                quant = faiss.IndexFlat(d, metric)
                index = faiss.IndexIVFFlat(quant, d, self.nlist, metric)
                index.cp.min_points_per_centroid = 1  # the codes are all there is to cluster
                index.train(vecs)
                index.nprobe = min(self.nprobe, self.nlist)
            else:
                index = faiss.IndexFlat(d, metric)
            index.add(vecs)
            self.indexes.append(index)
        self.version = version

    def search(self, x: Tensor, k: int) -> Tensor:
        """``(tokens, groups, d)`` -> ``(tokens, groups, k)`` ids, best first."""
        xs = x.detach().float().cpu()
        out = torch.empty(x.shape[0], len(self.indexes), k, dtype=torch.int64)
        for g, index in enumerate(self.indexes):
            _, ids = index.search(xs[:, g].contiguous().numpy(), k)
            out[:, g] = torch.from_numpy(ids)
        if bool((out < 0).any()):
            # IVF probed too few cells to find k codes for some token.
            raise ValueError(
                f"FAISS IVF search found fewer than k={k} codes for some tokens; "
                f"raise nprobe={self.nprobe} (nlist={self.nlist})"
            )
        return out.to(x.device)
