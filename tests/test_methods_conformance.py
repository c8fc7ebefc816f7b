"""One contract for every registered adapter method, on the tiny GPT-2, Llama and BERT bases.

The cases come from ``registered_methods()``: each method's rows in ``ROWS`` (a case id, config
options and what the row declares about itself), or, for a method with no row, one row of its
config's defaults. A newly registered method is therefore covered without a line here. What a
method can do is read from the method itself wherever it says so: whether it has a peft format
(``Method.peft``), whether it trains from its config alone or is made over other adapters
(``Method.trains_alone``: a fusion), whether it merges (its modules give ``weight_update`` or
``weight_scale``) and whether it runs per row (its modules' ``mixed``). A row declares only what
cannot be read: that a new adapter is not the base (``not_identity``, with the reason), checks
that fail today (``known``, strict xfails with the reason), and which checks a variant needs
(``checks``). A method that does not train alone is made the one way adapterkit makes such an
adapter, ``add_fusion`` over two bottlenecks, and runs as its ``Fuse`` block.

Every case checks: a new adapter is the base exactly; one optimizer step moves its parameters
and nothing else; our format and peft's (both ways) round-trip; merging and unmerging; mixed
batch rows equal each row run alone, beside one adapter of every other method and the bare base;
a Stack with a bottleneck; equal gradients with gradient checkpointing (causal bases); and bad
files (truncated, a tensor of the wrong shape) refused with our error. Two ranks of DDP giving
one process's adapter is ``test_distributed.py``'s job: its worker trains one case per method,
taken from here (``distributed_configs``).

The bases get non-zero biases (they start at zero): a method that mishandles a bias (DoRA's y - b,
IA³'s scaled bias when merged) must show it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import adapterkit as ak
from adapterkit.io import base_fingerprint, forget_base_fingerprint
from adapterkit.io.tensors import crc32
from adapterkit.methods import AdapterModule, Method, registered_methods
from adapterkit.methods.bottleneck import PLACEMENTS
from adapterkit.mixed import SEGMENT_MIN_TOKENS
from conftest import batch, biased_base, logits, rows_alone

ARCHS = ["gpt2", "llama", "bert"]
CAUSAL = ["gpt2", "llama"]  # gradient checkpointing: the bases whose blocks checkpoint
CHECKS = ("identity", "training", "our_format", "peft_format", "merging", "mixed_rows", "stack", "checkpointing",
          "checkpointing_switch", "bad_files")


@dataclasses.dataclass(frozen=True)
class Row:
    """One case of a method. ``kwargs``: its config's options (a fusion's: ``add_fusion``'s);
    ``not_identity``: why a new adapter is not the bare base (None: it is, exactly);
    ``known``: check (or "check/arch") -> why it fails today, run as a strict xfail;
    ``requires``: a config field the row needs, skipped while the config has none;
    ``checks``: the checks it runs (a variant that only changes what is saved needs no more)."""

    id: str
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    not_identity: str | None = None
    known: dict[str, str] = dataclasses.field(default_factory=dict)
    requires: str | None = None
    checks: tuple[str, ...] = CHECKS


ROWS: dict[str, list[Row]] = {
    "bottleneck": [
        Row(f"bottleneck-{placement}", {"placement": placement, "bottleneck_size": 4}) for placement in PLACEMENTS
    ],
    "lora": [
        Row("lora", {"r": 4, "alpha": 8, "dropout": 0.1}),
        Row("lora-dora", {"r": 4, "alpha": 8, "use_dora": True}, requires="use_dora"),
        Row("lora-rslora-top", {"r": 8, "alpha": 16, "use_rslora": True, "layers": [1]}),
    ],
    "adalora": [
        Row("adalora", {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 1, "deltaT": 1, "total_step": 4,
                        "dropout": 0.1}),
    ],
    "ia3": [Row("ia3"), Row("ia3-top", {"layers": [1]})],
    "vera": [
        Row("vera", {"r": 8}),
        Row("vera-no-projection", {"r": 4, "save_projection": False, "projection_prng_key": 3},
            checks=("our_format", "peft_format", "bad_files")),  # the projections made again from the seed
    ],
    "fusion": [Row(
        "fusion", {"temperature": 2.0},
        not_identity="a fusion mixes its children's changes from the start: its children are not the base",
    )],
}


def rows_of(method: Method) -> list[Row]:
    """The method's rows, or one row of its config's defaults."""
    return ROWS.get(method.name) or [Row(method.name)]


def lacks(method: Method, row: Row) -> bool:
    return row.requires is not None and row.requires not in {f.name for f in dataclasses.fields(method.config_class)}


def first_row(method: Method) -> Row | None:
    return next((row for row in rows_of(method) if not lacks(method, row)), None)


def cases(check: str, archs: list[str] = ARCHS) -> list:
    params = []
    for method in registered_methods():
        for row in rows_of(method):
            if check not in row.checks:
                continue
            for arch in archs:
                marks = []
                if lacks(method, row):
                    reason = f"{method.config_class.__name__} has no field {row.requires!r} yet"
                    marks.append(pytest.mark.skip(reason=reason))
                reason = row.known.get(f"{check}/{arch}", row.known.get(check))
                if reason is not None:
                    marks.append(pytest.mark.xfail(strict=True, reason=reason))
                params.append(pytest.param(method, row, arch, id=f"{row.id}-{arch}", marks=marks))
    return params


def distributed_configs() -> dict[str, ak.AdapterConfig]:
    """One config per method that trains alone (its first row), with no dropout (ranks would draw
    other masks than one process does): what test_distributed's worker trains."""
    configs = {}
    for method in registered_methods():
        row = first_row(method)
        if method.trains_alone and row is not None:
            kwargs = dict(row.kwargs)
            if "dropout" in {f.name for f in dataclasses.fields(method.config_class)}:
                kwargs["dropout"] = 0.0
            configs[method.name] = method.config_class(**kwargs)
    return configs


# ---- building --------------------------------------------------------------------------------------
@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tensors this small run many times faster on one thread than on several busy ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)




@dataclasses.dataclass
class Subject:
    """The adapter under test: its name, and what runs it (its name, or a fusion's Fuse block)."""

    model: ak.AdapterModel
    name: str
    run: str | ak.Fuse

    @property
    def layers(self) -> torch.nn.ModuleDict:
        return self.model.adapter_layers[self.name]

    @property
    def modules(self) -> dict[str, AdapterModule]:
        return {key: module for key, module in self.layers.items() if isinstance(module, AdapterModule)}

    @property
    def needs(self) -> list[str]:
        """The adapters it is made over (a fusion's children), to save and load before it."""
        return self.model.adapters[self.name].depends_on()

    def train(self) -> None:
        if isinstance(self.run, str):
            self.model.train_adapter(self.name)
        else:
            self.model.train_fusion(self.run)


def perturb(model: ak.AdapterModel, name: str, seed: int) -> None:
    """Move every parameter of an adapter off its start, as training would."""
    generator = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for parameter in model.adapter_layers[name].parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)


def add(model: ak.AdapterModel, method: Method, row: Row, name: str = "subject", seed: int = 0,
        perturbed: bool = True) -> Subject:
    torch.manual_seed(seed)
    if method.trains_alone:
        model.add_adapter(name, method.config_class(**row.kwargs))
        run = name
    else:  # made over adapters that are there: a fusion over two bottlenecks, as add_fusion makes it
        children = [f"{name}-child{i}" for i in range(2)]
        for child in children:
            model.add_adapter(child, ak.BottleneckConfig(bottleneck_size=4, init="bert"))
        run = ak.Fuse(*children, name=name)
        model.add_fusion(run, **row.kwargs)
    if perturbed:
        perturb(model, name, seed)
    return Subject(model, name, run)


def subject(method: Method, row: Row, arch: str, perturbed: bool = True) -> Subject:
    return add(ak.AdapterModel(biased_base(arch)).eval(), method, row, perturbed=perturbed)


def bystanders(model: ak.AdapterModel, method: Method, seed: int = 10) -> list[str]:
    """One adapter of every other method that trains alone (its first row), perturbed."""
    names = []
    for i, other in enumerate(m for m in registered_methods() if m.trains_alone and m.name != method.name):
        names.append(add(model, other, first_row(other), f"other-{other.name}", seed + i).name)
    return names


def next_row(method: Method, row: Row) -> Row:
    """The method's next row (the same one when it has one): a second adapter of the method that
    differs in its options where the method has several rows."""
    rows = [other for other in rows_of(method) if not lacks(method, other)]
    return rows[(rows.index(row) + 1) % len(rows)]


def loss(model: ak.AdapterModel, arch: str, inputs: dict) -> torch.Tensor:
    rows = len(inputs["input_ids"])
    labels = inputs["input_ids"] if arch in CAUSAL else torch.arange(rows) % model.config.num_labels
    return model(**inputs, labels=labels).loss


def cloned(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: tensor.detach().clone() for key, tensor in tensors.items()}


def equal(tensors: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> bool:
    return tensors.keys() == before.keys() and all(torch.equal(tensors[key], before[key]) for key in before)


def mergeable(module: AdapterModule) -> bool:
    kind = type(module)
    return kind.weight_update is not AdapterModule.weight_update or kind.weight_scale is not AdapterModule.weight_scale


def runs_per_row(module: AdapterModule) -> bool:
    return module.mixed is not None or module.hook == "composition"  # a fusion runs inside its rows' Fuse blocks


# ---- the table itself --------------------------------------------------------------------------------
def test_every_registered_method_has_cases():
    registered = {method.name for method in registered_methods()}
    assert not set(ROWS) - registered, f"rows for methods that are not registered: {sorted(set(ROWS) - registered)}"
    for method in registered_methods():
        if method.name not in ROWS:
            try:
                method.config_class()
            except Exception as error:  # noqa: BLE001 - any failure: the method needs a row
                pytest.fail(f"method {method.name!r} has no row in ROWS and its config cannot be made from its "
                            f"defaults ({type(error).__name__}: {error}); add a row with the options it needs")
        for row in rows_of(method):
            assert {key.split("/")[0] for key in row.known} | set(row.checks) <= set(CHECKS), (method.name, row.id)
    assert len({row.id for method in registered_methods() for row in rows_of(method)}) == sum(
        len(rows_of(method)) for method in registered_methods())


def test_the_distributed_worker_trains_every_method_that_trains_alone():
    from distributed_worker import METHODS

    assert set(METHODS) == {method.name for method in registered_methods() if method.trains_alone}


# ---- the contract ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, row, arch", cases("identity"))
def test_a_new_adapter_is_the_base_and_disabled_is_the_base(method, row, arch):
    expected = logits(biased_base(arch))
    case = subject(method, row, arch, perturbed=False)
    model = case.model
    model.set_active(case.run)
    if row.not_identity is None:
        assert torch.equal(logits(model), expected)
    else:
        assert not torch.equal(logits(model), expected), f"declared not the base ({row.not_identity}), but it is"
    perturb(model, case.name, 1)
    assert not torch.allclose(logits(model), expected)  # a changed adapter changes the outputs
    active, composition = model.active, model.active_composition
    with model.disabled():
        assert torch.equal(logits(model), expected)
    assert (model.active, model.active_composition) == (active, composition)


@pytest.mark.parametrize("method, row, arch", cases("training"))
def test_one_optimizer_step_moves_the_adapter_and_nothing_else(method, row, arch):
    case = subject(method, row, arch, perturbed=False)
    model = case.model
    bystanders(model, method)
    base_before = cloned(model.base.state_dict())
    before = {name: cloned(model.adapter_layers[name].state_dict()) for name in model.adapters}
    model.set_active(case.run)
    initial = logits(model)
    case.train()
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable and trainable == {id(p) for p in case.layers.parameters()}
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    loss(model, arch, batch(seed=3, rows=3)).backward()
    optimizer.step()
    model.step(0)
    optimizer.zero_grad()
    model.eval()
    assert equal(model.base.state_dict(), base_before)
    for name in model.adapters:
        if name != case.name:
            assert equal(model.adapter_layers[name].state_dict(), before[name]), name
    after = case.layers.state_dict()
    moved = {key for key in after if not torch.equal(after[key], before[case.name][key])}
    assert moved <= dict(case.layers.named_parameters()).keys()  # buffers and shared tensors stay
    assert {key.split(".")[0] for key in moved} == set(case.modules)  # every site learns
    assert not torch.equal(logits(model), initial)


@pytest.mark.parametrize("method, row, arch", cases("our_format"))
def test_our_format_round_trips_exactly(method, row, arch, tmp_path):
    case = subject(method, row, arch)
    model = case.model
    model.set_active(case.run)
    expected = logits(model)
    names = [*case.needs, case.name]
    for name in names:
        model.save_adapter(name, tmp_path / name)
    assert sorted(os.listdir(tmp_path / case.name)) == ["adapter_config.json", "adapter_model.safetensors"]
    state = model.adapter_state_dict(case.name)
    on_disk = load_file(tmp_path / case.name / "adapter_model.safetensors")
    assert on_disk.keys() == model.adapters[case.name].tensors_to_save(state).keys()
    fresh = ak.AdapterModel(biased_base(arch)).eval()
    for name in names:
        assert fresh.load_adapter(tmp_path / name) == name
    assert fresh.adapters[case.name] == model.adapters[case.name]
    assert equal(fresh.adapter_state_dict(case.name), state)
    fresh.set_active(case.run)
    assert torch.equal(logits(fresh), expected)


def peft_document(method: Method, case: Subject) -> dict[str, Any]:
    """The row's config as peft's adapter_config.json, through the method's PeftFormat."""
    ours = case.model.adapters[case.name].to_dict()
    document = {theirs: ours[mine] for theirs, mine in method.peft.fields.items()}
    if method.peft.to_peft is not None:
        method.peft.to_peft(case.model.adapters[case.name], case.model.adapter_sites(case.name), document)
    return {**document, "peft_type": method.peft.peft_type}


@pytest.mark.parametrize("method, row, arch", cases("peft_format"))
def test_peft_format_both_ways(method, row, arch, tmp_path):
    case = subject(method, row, arch)
    model = case.model
    if method.peft is None:
        with pytest.raises(ak.ConfigError, match="has no peft format"):
            model.save_adapter(case.name, tmp_path / "ours", format="peft")
        assert not (tmp_path / "ours").exists()
        return
    peft = pytest.importorskip("peft")
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    model.set_active(case.run)
    expected = logits(model)
    model.save_adapter(case.name, tmp_path / "ours", format="peft")
    loaded = peft.PeftModel.from_pretrained(biased_base(arch), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=1e-5)
    again = ak.AdapterModel(biased_base(arch)).eval()  # and back: our own peft folder is read exactly
    again.set_active(again.load_adapter(tmp_path / "ours"))
    assert torch.equal(logits(again), expected)

    document = peft_document(method, case)
    config_class = PEFT_TYPE_TO_CONFIG_MAPPING[method.peft.peft_type]
    known = {field.name for field in dataclasses.fields(config_class)}  # as peft's from_pretrained, ignoring others
    theirs = peft.get_peft_model(biased_base(arch), config_class(**{k: v for k, v in document.items() if k in known}))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in theirs.parameters():
            if parameter.requires_grad:  # the adapter's
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    theirs.eval()
    expected = logits(theirs)
    assert not torch.allclose(expected, logits(biased_base(arch)))
    theirs.save_pretrained(tmp_path / "theirs")
    fresh = ak.AdapterModel(biased_base(arch)).eval()
    fresh.set_active(fresh.load_adapter(tmp_path / "theirs"))
    assert fresh.adapters["theirs"].method == method.name
    torch.testing.assert_close(logits(fresh), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method, row, arch", cases("merging"))
def test_merging_matches_and_unmerging_restores_the_base_bit_for_bit(method, row, arch):
    case = subject(method, row, arch)
    model, base = case.model, case.model.base
    original = cloned(base.state_dict())
    fingerprint = dict(base_fingerprint(base))
    if not all(mergeable(module) for module in case.modules.values()):
        with pytest.raises(ak.MergeError, match="cannot be merged"):
            model.merge(case.name)
        assert model.merged is None and equal(base.state_dict(), original)
        return
    model.set_active(case.run)
    unmerged = logits(model)
    model.set_active(None)
    model.merge(case.name)  # an inactive adapter: merging activates it
    assert model.merged == case.name and model.active == (case.name,)
    torch.testing.assert_close(logits(model), unmerged, rtol=0, atol=1e-5)
    for site in model.adapter_sites(case.name):  # merged layers hold the change and run with no hook at all
        layer = base.get_submodule(site.module_name)
        assert not torch.equal(layer.weight, original[f"{site.module_name}.weight"]), site.module_name
        assert not layer._forward_hooks and not layer._forward_pre_hooks, site.module_name
    model.unmerge()
    assert model.merged is None and equal(base.state_dict(), original)
    forget_base_fingerprint(base)
    assert base_fingerprint(base) == fingerprint  # computed afresh from the restored weights
    assert torch.equal(logits(model), unmerged)


@pytest.mark.parametrize("length", [8, SEGMENT_MIN_TOKENS])  # padded batched products; adapter by adapter
@pytest.mark.parametrize("method, row, arch", cases("mixed_rows"))
def test_mixed_batch_rows_equal_each_row_alone(method, row, arch, length):
    case = subject(method, row, arch)
    model = case.model
    others = bystanders(model, method)
    second = add(model, method, next_row(method, row), "second", seed=2)
    names = [case.run, None, *others, second.run, case.run, "base"]
    inputs = batch(seed=4, rows=len(names), length=length)
    if not all(runs_per_row(module) for module in case.modules.values()):
        with pytest.raises(ak.AdapterkitError, match="cannot run in a mixed-adapter batch"):
            model(**inputs, adapter_names=names)
        return
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=names).logits
    torch.testing.assert_close(mixed, rows_alone(model, inputs, names), rtol=0, atol=1e-5)
    assert not torch.allclose(mixed[0], mixed[1]) and not torch.allclose(mixed[0], mixed[-3])


@pytest.mark.parametrize("method, row, arch", cases("stack"))
def test_in_a_stack_with_a_bottleneck(method, row, arch):
    case = subject(method, row, arch)
    model = case.model
    torch.manual_seed(3)
    model.add_adapter("bottleneck", ak.BottleneckConfig(bottleneck_size=4, init="bert"))
    stack = ak.Stack(case.run, "bottleneck")
    model.set_active(case.run)
    alone = logits(model)
    model.set_active(stack)
    stacked = logits(model)
    assert not torch.allclose(stacked, alone)
    if isinstance(case.run, str):  # a stack of names is the plain list of active adapters
        model.set_active([case.run, "bottleneck"])
        assert torch.equal(logits(model), stacked)
    if all(runs_per_row(module) for module in case.modules.values()):
        names = [stack, None, stack]
        inputs = batch(seed=5, rows=len(names))
        with torch.no_grad():
            mixed = model(**inputs, adapter_names=names).logits
        torch.testing.assert_close(mixed, rows_alone(model, inputs, names), rtol=0, atol=1e-5)


PLAIN_GRADIENTS: dict[tuple[str, str], dict[str, torch.Tensor]] = {}  # both checkpointing tests compare with them


def plain_gradients(method: Method, row: Row, arch: str) -> dict[str, torch.Tensor]:
    if (row.id, arch) not in PLAIN_GRADIENTS:
        PLAIN_GRADIENTS[row.id, arch] = gradients(method, row, arch, checkpointing=False)
    return PLAIN_GRADIENTS[row.id, arch]


def gradients(method: Method, row: Row, arch: str, checkpointing: bool,
              switch_before_backward: bool = False) -> dict[str, torch.Tensor]:
    case = subject(method, row, arch)
    model = case.model
    torch.manual_seed(3)
    model.add_adapter("other", ak.BottleneckConfig(bottleneck_size=4, init="bert"))
    case.train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    torch.manual_seed(1)  # the same dropout masks: checkpointing replays the forward's random state
    value = loss(model, arch, batch(rows=3, length=12))
    if switch_before_backward:
        model.set_active("other")  # what the recomputation must not see
    value.backward()
    return {name: p.grad.clone() for name, p in case.layers.named_parameters() if p.requires_grad}


def assert_same_gradients(checkpointed: dict[str, torch.Tensor], plain: dict[str, torch.Tensor]) -> None:
    assert plain and all(g.abs().sum() > 0 for g in plain.values())
    assert checkpointed.keys() == plain.keys()
    for name in plain:
        # the message lambda is called (if at all) inside this iteration's assert_close
        torch.testing.assert_close(
            checkpointed[name], plain[name], rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}"  # noqa: B023
        )


@pytest.mark.parametrize("method, row, arch", cases("checkpointing", CAUSAL))
def test_gradient_checkpointing_gives_the_same_gradients(method, row, arch):
    assert_same_gradients(gradients(method, row, arch, checkpointing=True), plain_gradients(method, row, arch))


@pytest.mark.parametrize("method, row, arch", cases("checkpointing_switch", CAUSAL))
def test_gradient_checkpointing_recomputes_what_ran_whatever_is_active_at_backward(method, row, arch):
    checkpointed = gradients(method, row, arch, checkpointing=True, switch_before_backward=True)
    assert_same_gradients(checkpointed, plain_gradients(method, row, arch))


def damage(folder, how: str, format: str) -> str:
    """Break the weights file of a saved folder; the message loading must give."""
    weights = folder / "adapter_model.safetensors"
    if how == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
        match = "corrupt"
    else:  # one tensor a row short, in an otherwise sound file
        tensors = load_file(weights)
        key = sorted(tensors)[0]
        tensor = tensors[key]
        dim = max(range(tensor.dim()), key=lambda d: tensor.shape[d])
        tensors[key] = tensor.narrow(dim, 0, tensor.shape[dim] - 1).contiguous()
        save_file(tensors, weights, metadata={"format": "pt"})
        match = "has shape"
    if format == "adapterkit":  # the file itself must be found bad, not only its checksum
        document = json.loads((folder / "adapter_config.json").read_text())
        if how == "truncated":
            document.pop("weights_crc32")
        else:
            document["weights_crc32"] = crc32(weights.read_bytes())
        (folder / "adapter_config.json").write_text(json.dumps(document))
    return match


@pytest.mark.parametrize("method, row, arch", cases("bad_files"))
def test_bad_files_get_our_error(method, row, arch, tmp_path):
    case = subject(method, row, arch)
    model = case.model
    for name in case.needs:
        model.save_adapter(name, tmp_path / name)
    fresh = ak.AdapterModel(biased_base(arch))
    for name in case.needs:
        fresh.load_adapter(tmp_path / name)
    for format in ["adapterkit"] + (["peft"] if method.peft is not None else []):
        for how in ("truncated", "wrong shape"):
            folder = tmp_path / f"{format}-{how.replace(' ', '-')}"
            model.save_adapter(case.name, folder, format=format)
            match = damage(folder, how, format)
            with pytest.raises(ak.AdapterFileError, match=match):
                fresh.load_adapter(folder, name="bad")
    assert list(fresh.adapters) == case.needs
