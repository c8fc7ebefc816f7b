"""The key/value cache of a batch of rows: full-attention layers keep spare columns so a decode
step writes in place, and rows leave, join and drop columns no row attends to any more."""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer


class RoomyLayer(DynamicLayer):
    """A key/value layer kept in a buffer with spare columns, so that a decode step writes its one
    column in place. The stock layer concatenates, copying every row's whole history at every
    layer and step: on a CPU that copy took most of a 32-row decode step once prompts were a few
    hundred tokens long. Rows leaving (``batch_select_indices``) or joining (``splice``) cost one
    copy into a new buffer (a row may be selected several times: beam search copies a hypothesis's
    history into each beam that extends it); rows only moving among themselves (beams re-ranked)
    are copied in place, the moved ones alone; dropping columns on the left (``drop_left``) costs none."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._rooms: tuple[torch.Tensor, torch.Tensor] | None = None
        self._start = 0  # the buffers' first column in use

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length, new = self.get_seq_length(), key_states.shape[-2]
        if self._rooms is None:
            self._rooms, self._start = (_room_like(key_states, new), _room_like(value_states, new)), 0
        elif self._start + length + new > self._rooms[0].shape[-2]:
            self._move(self.keys, self.values, length + new)
        end = self._start + length
        for room, states in zip(self._rooms, (key_states, value_states)):
            room[..., end : end + new, :] = states
        self._view(length + new)
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        length = self.get_seq_length()
        if length and len(indices) == self.keys.shape[0]:
            self._reorder(indices)
        elif length:
            rooms = tuple(_room_like(states, length, rows=len(indices)) for states in (self.keys, self.values))
            for room, states in zip(rooms, (self.keys, self.values)):
                torch.index_select(states, 0, indices, out=room[..., :length, :])
            self._rooms, self._start = rooms, 0
            self._view(length)

    def _reorder(self, indices: torch.Tensor) -> None:
        """As many rows as before, moved among themselves (beams re-ranked): only the rows that
        change are copied, in place, so the other rows keep writing into the same buffers."""
        moved = (indices != torch.arange(len(indices), device=indices.device)).nonzero().squeeze(1)
        for states in (self.keys, self.values):
            states[moved] = states[indices[moved]]

    def drop_left(self, columns: int) -> None:
        """Forget the first ``columns`` columns (no row attends to them any more)."""
        length = self.get_seq_length()
        self._start += columns
        self._view(length - columns)

    def splice(self, other: RoomyLayer, length: int) -> None:
        """These rows, then ``other``'s, each right-aligned to ``length`` columns (zeros before:
        masked columns still enter the attention sum with weight 0, so they must be finite)."""
        n, mine, theirs = self.keys.shape[0], self.get_seq_length(), other.get_seq_length()
        rooms = []
        for own, added in ((self.keys, other.keys), (self.values, other.values)):
            room = own.new_empty((n + added.shape[0], own.shape[1], _roomy(length), own.shape[-1]))
            room[:n, :, : length - mine].zero_()
            room[:n, :, length - mine : length] = own
            room[n:, :, : length - theirs].zero_()
            room[n:, :, length - theirs : length] = added
            rooms.append(room)
        self._rooms, self._start = tuple(rooms), 0
        self._view(length)

    def _move(self, keys: torch.Tensor, values: torch.Tensor, columns: int) -> None:
        """Into new buffers with room for ``columns`` columns and some to spare."""
        length = keys.shape[-2]
        self._rooms, self._start = (_room_like(keys, columns), _room_like(values, columns)), 0
        for room, states in zip(self._rooms, (keys, values)):
            room[..., :length, :] = states
        self._view(length)

    def _view(self, length: int) -> None:
        keys, values = self._rooms
        self.keys = keys[..., self._start : self._start + length, :]
        self.values = values[..., self._start : self._start + length, :]


def _room_like(states: torch.Tensor, columns: int, rows: int | None = None) -> torch.Tensor:
    """A buffer for ``rows`` rows (default: as many as ``states``) of ``columns`` columns and room to spare."""
    return states.new_empty((states.shape[0] if rows is None else rows, states.shape[1], _roomy(columns),
                             states.shape[-1]))


def _roomy(columns: int) -> int:
    return columns + max(64, columns // 2)


def roomy_cache(model: nn.Module) -> DynamicCache:
    """A cache for ``model`` whose full-attention layers keep spare columns (sliding-window and
    other kinds of layer stay as transformers makes them)."""
    config = getattr(model, "config", None)
    cache = DynamicCache(config=config) if config is not None else DynamicCache()
    if cache.layers:
        cache.layers = [RoomyLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    else:
        cache.layer_class_to_replicate = RoomyLayer
    return cache


def pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
