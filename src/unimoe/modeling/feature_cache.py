"""Frozen encoders' outputs kept per media item, so that later epochs over the same items skip them.

A training run over a small data set for several epochs feeds the same images, clips and audio
chunks through encoders that do not change (frozen, in eval mode): their outputs can be computed
once. ``FrozenFeatureCache`` keeps them keyed by the media item itself, the tensor a cached
``EncodedSample`` holds (``SupervisedDataset(cache=True)``), and drops an entry when its item is
freed; an item it has not seen, or a new tensor for the same media, is encoded as usual. The loop
names the current batch's items with ``batch(...)``; ``UniMoeModel.media_embeddings`` encodes only
the ones missing. Each row of an encoder's output depends on its own input alone (an image, a clip,
a chunk), so a cached row is the row the whole batch would give, up to floating-point rounding.

The outputs stay on the model's device: this is for data sets whose encoder outputs fit in memory.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from itertools import accumulate

import torch

from ..modalities import MODALITIES

Encoded = tuple[torch.Tensor, torch.Tensor | None]  # encoder output rows and their padding mask, if any


class FrozenFeatureCache:
    """Encoder outputs per media item (see the module docstring); ``hits`` and ``misses`` count items."""

    def __init__(self) -> None:
        self._entries: dict[int, Encoded] = {}
        self._items: dict[str, Sequence[torch.Tensor]] = {}
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @contextlib.contextmanager
    def batch(self, items: Mapping[str, Sequence[torch.Tensor]]) -> Iterator[None]:
        """Within the block, the batch's media items by modality, in the order the model inputs hold
        their rows (one row per image or clip, one per chunk of a speech or audio item)."""
        self._items = dict(items)
        try:
            yield
        finally:
            self._items = {}

    def has_items(self, modality: str) -> bool:
        """Whether the current batch named its ``modality`` items."""
        return bool(self._items.get(modality))

    def encode(
        self,
        modality: str,
        features: torch.Tensor,
        mask: torch.Tensor | None,
        encode: Callable[[torch.Tensor, torch.Tensor | None], Encoded],
    ) -> Encoded:
        """The encoder output of the batch's ``modality`` rows ``features`` (and ``mask``): kept rows for
        the items seen before, ``encode`` on the rows of the others (in one call)."""
        items = self._items[modality]
        rows = [len(item) if MODALITIES[modality].chunked else 1 for item in items]
        if sum(rows) != len(features):
            raise ValueError(
                f"{modality}: the batch holds {len(features)} rows but its {len(items)} items have {sum(rows)}"
            )
        missing = [i for i, item in enumerate(items) if id(item) not in self._entries]
        if missing:
            if len(missing) == len(items):
                encoded, out_mask = encode(features, mask)
            else:
                starts = [0, *accumulate(rows)]
                index = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in missing]).to(
                    features.device
                )
                encoded, out_mask = encode(features[index], None if mask is None else mask[index])
            offset = 0
            for i in missing:
                part = slice(offset, offset + rows[i])
                self._keep(items[i], encoded[part], None if out_mask is None else out_mask[part])
                offset += rows[i]
        self.hits += len(items) - len(missing)
        self.misses += len(missing)
        kept = [self._entries[id(item)] for item in items]
        if len(kept) == 1:
            return kept[0]
        out_mask = None if kept[0][1] is None else torch.cat([m for _, m in kept])
        return torch.cat([e for e, _ in kept]), out_mask

    def clear(self) -> None:
        """Drops every kept output."""
        self._entries.clear()

    def _keep(self, item: torch.Tensor, encoded: torch.Tensor, mask: torch.Tensor | None) -> None:
        key = id(item)  # unique while the item lives; the entry goes when it is freed
        self._entries[key] = (encoded.detach().clone(), None if mask is None else mask.clone())
        weakref.finalize(item, _forget, weakref.ref(self), key)


def _forget(cache_ref: weakref.ref, key: int) -> None:
    cache = cache_ref()
    if cache is not None:
        cache._entries.pop(key, None)
