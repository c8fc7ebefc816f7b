"""Adapters on demand: the folder a server serves from, and the pool of adapters loaded from it.

A request holds every adapter it runs through (a composition's members, and its fusions after
their children) from before its rows are queued until they leave the batch, and it acquires them
together or not at all. Loading never waits for room: the adapters that requests hold always stay
loaded, and ``capacity`` bounds the *idle* ones kept for later, least recently used unloaded first.
So acquisition only ever waits for a load already in progress, which ends; no set of requests can
wait on each other. (When held adapters counted against the cap, a request for a cold adapter
waited for another whole request once every slot was held: with 1,000 adapters on disk and 16
resident, 32 clients got 2.88x the one-at-a-time throughput against 4.0x with 8 adapters, and a
3-member stack under a cap of 2 waited for good.) Adapters loaded are at most ``capacity`` plus
those the requests in flight or queued use, which the batch and queue limits bound.

Errors are adapterkit's own; the routes decide what status each becomes.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import AdapterInUseError, AdapterkitError, AdapterLoadError, AdapterNameError, AdapterNotFoundError
from ..generation import Engine
from ..io import CONFIG_FILE, FUSION_CONFIG_FILE, check_base, read_adapter, read_adapter_config
from ..names import check_adapter_name, is_valid_name
from ..templates import check_template

log = logging.getLogger(__name__)

RUN_ADAPTER = "adapter"  # inside a training run's output folder


def adapter_folder(path: Path) -> Path | None:
    """The adapter a sub-folder of the adapters folder holds: itself, or a training run's adapter/."""
    for candidate in (path, path / RUN_ADAPTER):
        if (candidate / CONFIG_FILE).is_file() or (candidate / FUSION_CONFIG_FILE).is_file():
            if candidate == path or candidate.resolve().parent == path.resolve():  # never a link out of the run
                return candidate
    return None


def find_adapters(folder: Path) -> dict[str, Path]:
    """{name: adapter folder} of every sub-folder that is an adapter or a training run."""
    folder = folder.resolve()
    found = {}
    for path in folder.iterdir():
        if is_valid_name(path.name) and path.resolve().parent == folder:
            adapter = adapter_folder(path)
            if adapter is not None:
                found[path.name] = adapter
    return found


class AdapterPool:
    """The adapters of one folder, loaded on first use (see the module's docstring for the rules).

    Only folders directly inside the folder are read, by names that cannot hold a path. Files are
    read and checked off the engine's lock; only attaching and detaching tensors take it."""

    def __init__(self, engine: Engine, folder: Path, capacity: int,
                 on_load: Callable[[], None] = lambda: None) -> None:
        """``on_load`` is called after each adapter read from the folder (the metrics count them)."""
        self.engine, self.model = engine, engine.model
        self.folder = folder.resolve()
        self.capacity = capacity
        self.on_load = on_load
        self.resident: OrderedDict[str, None] = OrderedDict((name, None) for name in self.model.adapters)
        self.holds: Counter[str] = Counter()
        self.templates: dict[str, str | None] = {}  # of the adapters loaded from the folder
        self.loading: set[str] = set()
        self.unloading: set[str] = set()  # evicted, being detached in the background
        self._background: set[asyncio.Task] = set()
        self._changed: asyncio.Condition | None = None

    @property
    def changed(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    # ---- the folder ----------------------------------------------------------------------------
    def path_of(self, name: str) -> Path:
        check_adapter_name(name)
        path = self.folder / name
        try:
            if path.resolve().parent != self.folder:
                raise AdapterNameError(f"adapter {name!r} is a link out of the adapters folder; refusing to read it")
            found = adapter_folder(path)
        except OSError:
            found = None
        if found is None:
            raise AdapterNotFoundError(f"the model {name!r} does not exist: no adapter folder of that name")
        return found

    def available(self) -> list[str]:
        """The adapters the folder holds now; OSError when it cannot be read."""
        return sorted(find_adapters(self.folder))

    def template(self, name: str) -> str | None:
        """The prompt template adapter ``name`` records (read from its folder until it is loaded)."""
        if name not in self.templates:
            try:
                return check_template(read_adapter_config(self.path_of(name)).get("prompt_template"))
            except (AdapterNameError, AdapterLoadError):
                raise
            except AdapterkitError as error:
                raise AdapterLoadError(self._hide_paths(f"adapter {name!r} cannot be loaded: {error}")) from None
        return self.templates[name]

    # ---- holding -------------------------------------------------------------------------------
    async def acquire(self, names: Sequence[str], holds: int = 1) -> None:
        """Hold each of ``names`` ``holds`` times, loading those that are not loaded, in order (a
        fusion after its children); on any failure nothing stays held. Waits only for loads in
        progress. A loaded adapter serves on even if its folder went."""
        async with self.changed:
            while any(name in self.loading or name in self.unloading for name in names):
                await self.changed.wait()
            missing = [name for name in dict.fromkeys(names) if name not in self.resident]
            paths = [self.path_of(name) for name in missing]
            held = [name for name in names if name in self.resident]
            self._hold(held, holds)
            self.loading.update(missing)
            try:
                for name, path in zip(missing, paths):
                    await self._load_unlocked(name, path)
                    self._hold([name], holds)
                    held.append(name)
            except BaseException:
                self._hold(held, -holds)
                raise
            finally:
                self.loading.difference_update(missing)
                self._trim()
                self.changed.notify_all()
            for name in names:
                self.resident.move_to_end(name)

    async def release(self, names: Sequence[str], holds: int = 1) -> None:
        async with self.changed:
            self._hold(names, -holds)
            self._trim()
            self.changed.notify_all()

    def _hold(self, names: Sequence[str], count: int) -> None:
        for name in names:
            self.holds[name] += count
            if self.holds[name] <= 0:
                del self.holds[name]

    # ---- the management API --------------------------------------------------------------------
    async def reload(self, name: str) -> dict[str, Any]:
        """Load ``name`` afresh from its folder (replacing the loaded copy, which nothing may use)."""
        path = self.path_of(name)
        async with self.changed:
            while name in self.loading or name in self.unloading:
                await self.changed.wait()
            reloaded = name in self.resident
            if reloaded:
                self.refuse_if_used(name)
                await self._detach(name)
            self.loading.add(name)
            try:
                await self._load_unlocked(name, path)
            finally:
                self.loading.discard(name)
                self._trim()
                self.changed.notify_all()
            return {"name": name, "method": self.model.adapters[name].method, "loaded": True, "reloaded": reloaded}

    async def unload(self, name: str) -> None:
        """Detach ``name`` once any load of it in progress has ended; AdapterInUseError while
        requests hold it."""
        check_adapter_name(name)
        async with self.changed:
            while name in self.loading or name in self.unloading:
                await self.changed.wait()
            if name not in self.resident:
                raise AdapterNotFoundError(f"no adapter named {name!r} is loaded")
            self.refuse_if_used(name)
            await self._detach(name)
            self.changed.notify_all()

    def refuse_if_used(self, name: str) -> None:
        """AdapterInUseError when a request or a loaded fusion uses ``name``: what reloading or
        unloading it would break."""
        if self.holds[name]:
            raise AdapterInUseError(f"adapter {name!r} is serving {self.holds[name]} request(s); "
                                    "retry when they finish")
        users = [other for other in self.resident if name in self.model.adapters[other].depends_on()]
        if users:
            raise AdapterInUseError(f"adapter {name!r} is a child of the loaded fusion(s) {users}; unload those first")

    # ---- loading and unloading -----------------------------------------------------------------
    async def _load_unlocked(self, name: str, path: Path) -> None:
        """Load with the pool's condition released, so that requests for loaded adapters go on. A
        load runs to its end even when the request that started it is cancelled (its client left),
        so that what the model holds and what the pool records never part."""
        self.changed.release()
        loading = asyncio.ensure_future(asyncio.to_thread(self._load, name, path))
        try:
            await asyncio.shield(loading)
        finally:
            await asyncio.wait({loading})
            await self.changed.acquire()
            if not loading.cancelled() and loading.exception() is None:
                self.resident[name] = None
                self.on_load()

    def _load(self, name: str, path: Path) -> None:
        """Read, check and attach one adapter (on a worker thread). Every failure becomes an
        AdapterLoadError: an exception that a future cannot carry (StopIteration) would leave the
        request waiting for good."""
        try:
            saved = read_adapter(path, self.model.base)
            if saved.base is not None:
                check_base(saved.base, self.model.base, path)
            self._locked(self.model.add_adapter, name, saved.config, saved.tensors)
            self.templates[name] = saved.prompt_template
        except AdapterkitError as error:
            raise AdapterLoadError(self._hide_paths(f"adapter {name!r} cannot be loaded: {error}")) from None
        except OSError as error:
            raise AdapterLoadError(
                self._hide_paths(f"adapter {name!r} cannot be read: {error.strerror or error}")) from None
        except Exception as error:
            log.exception("loading adapter %r failed", name)
            raise AdapterLoadError(f"adapter {name!r} cannot be loaded: unexpected {type(error).__name__}") from None

    def _trim(self) -> None:
        """Evict least recently used idle adapters beyond the cap (never one a loaded fusion needs).
        They leave the pool at once and are detached in the background: detaching waits for the
        engine's lock (up to a step), and acquisitions must not queue behind it."""
        evicted = []
        while sum(1 for name in self.resident if not self.holds[name]) > self.capacity:
            needed = {n for name in self.resident for n in self.model.adapters[name].depends_on()}
            idle = next((name for name in self.resident if not self.holds[name] and name not in needed), None)
            if idle is None:
                break
            del self.resident[idle]
            self.templates.pop(idle, None)
            evicted.append(idle)
        if evicted:
            self.unloading.update(evicted)
            self._background.add(task := asyncio.ensure_future(self._detach_evicted(evicted)))
            task.add_done_callback(self._background.discard)

    async def _detach_evicted(self, names: list[str]) -> None:
        try:
            await asyncio.to_thread(self._locked_each, self.model.delete_adapter, names)
        finally:
            async with self.changed:
                self.unloading.difference_update(names)
                self.changed.notify_all()

    async def _detach(self, name: str) -> None:
        await asyncio.to_thread(self._locked, self.model.delete_adapter, name)
        del self.resident[name]
        self.templates.pop(name, None)

    def _hide_paths(self, message: str) -> str:
        """Errors name files relative to the adapters folder: clients never see server paths."""
        return message.replace(f"{self.folder}/", "").replace(str(self.folder), "<adapters>")

    def _locked(self, function: Callable, *args):
        with self.engine.lock:
            return function(*args)

    def _locked_each(self, function: Callable, items: Sequence) -> None:
        with self.engine.lock:
            for item in items:
                function(item)
