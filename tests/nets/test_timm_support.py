"""timm hook: tested against a stand-in ``timm`` whose registry and ``create_model`` follow timm's own
(``timm/models/_registry.py``, ``timm/models/_factory.py``), since the real timm cannot be imported
here, and against a timm that is missing or fails to import."""

import fnmatch
import sys
import types
from collections import defaultdict

import pytest
import torch

from medssm.nets import medmamba
from medssm.nets.timm_support import TIMM_MODELS, register_with_timm


def _fake_timm():
    """Modules ``timm``, ``timm.models``, ``timm.models._registry`` with timm's registry behaviour."""
    registry = types.ModuleType("timm.models._registry")
    registry._model_entrypoints = {}
    registry._model_to_module = {}
    registry._module_to_models = defaultdict(set)

    def register_model(fn):  # as timm: module from fn.__module__, name appended to its __all__
        mod = sys.modules[fn.__module__]
        module_name = fn.__module__.split(".")[-1]
        if hasattr(mod, "__all__"):
            mod.__all__.append(fn.__name__)
        else:
            mod.__all__ = [fn.__name__]
        registry._model_entrypoints[fn.__name__] = fn
        registry._model_to_module[fn.__name__] = module_name
        registry._module_to_models[module_name].add(fn.__name__)
        return fn

    def is_model(model_name):
        return model_name.split(".", 1)[0] in registry._model_entrypoints

    def list_models(filter="", module=""):
        names = registry._module_to_models[module] if module else set(registry._model_entrypoints)
        return sorted(n for n in names if not filter or fnmatch.fnmatch(n, filter))

    def create_model(model_name, pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None,
                     checkpoint_path="", scriptable=None, exportable=None, no_jit=None, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if v is not None}  # timm prunes None arguments
        model_name, tag = (model_name.split(".", 1) + [""])[:2]
        if tag and not pretrained_cfg:
            pretrained_cfg = tag
        if not is_model(model_name):
            raise RuntimeError(f"Unknown model ({model_name})")
        return registry._model_entrypoints[model_name](
            pretrained=pretrained, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=pretrained_cfg_overlay,
            **kwargs)

    for fn in (register_model, is_model, list_models):
        setattr(registry, fn.__name__, fn)
    models = types.ModuleType("timm.models")
    models._registry = registry
    models.register_model, models.is_model, models.list_models = register_model, is_model, list_models
    models.create_model = create_model
    timm = types.ModuleType("timm")
    timm.models, timm.create_model, timm.list_models = models, create_model, list_models
    return timm


@pytest.fixture
def fake_timm(monkeypatch):
    timm = _fake_timm()
    modules = {"timm": timm, "timm.models": timm.models, "timm.models._registry": timm.models._registry}
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(medmamba, "__all__", list(medmamba.__all__))  # timm appends to it
    return timm


def test_timm_creates_medmamba(fake_timm):
    assert register_with_timm() == list(TIMM_MODELS)
    assert fake_timm.list_models("medmamba*", module="medmamba") == sorted(TIMM_MODELS)
    assert set(TIMM_MODELS) <= set(medmamba.__all__) and all(hasattr(medmamba, n) for n in medmamba.__all__)

    model = fake_timm.create_model("medmamba_t", num_classes=6, drop_rate=0.0, global_pool=None)
    assert isinstance(model, medmamba.MedMamba)
    assert sum(p.numel() for p in model.parameters()) == 14_457_222
    assert model.pretrained_cfg["classifier"] == "head" and model.pretrained_cfg["num_classes"] == 6

    tiny = fake_timm.create_model("medmamba_tiny", num_classes=2, in_chans=1).eval()
    assert tiny.pretrained_cfg["input_size"] == (1, 224, 224)
    with torch.no_grad():
        assert tiny(torch.randn(2, 1, 28, 28)).shape == (2, 2)
    assert tiny.medssm_config == {"name": "medmamba_tiny", "kwargs": {"num_classes": 2, "in_chans": 1}}


def test_timm_pretrained_is_refused_and_registration_is_idempotent(fake_timm):
    register_with_timm()
    with pytest.raises(ValueError, match="no pretrained weights"):
        fake_timm.create_model("medmamba_tiny", pretrained=True)
    assert register_with_timm() == []


def test_existing_timm_models_are_not_replaced(fake_timm):
    def medmamba_t(pretrained=False, **kwargs):
        return "timm's own"

    medmamba_t.__module__ = __name__
    fake_timm.models.register_model(medmamba_t)
    assert register_with_timm() == [n for n in TIMM_MODELS if n != "medmamba_t"]
    assert fake_timm.create_model("medmamba_t") == "timm's own"


def test_a_failing_timm_registry_warns_instead_of_raising(fake_timm, monkeypatch):
    def broken(fn):
        raise TypeError("registry API changed")

    monkeypatch.setattr(fake_timm.models, "register_model", broken)
    with pytest.warns(RuntimeWarning, match="registry API changed"):
        assert register_with_timm() == []


def test_missing_timm_registers_nothing(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    assert register_with_timm() == []


@pytest.mark.parametrize("error", ["ImportError", "OSError", "RuntimeError", "AttributeError"])
def test_broken_timm_registers_nothing(error, tmp_path, monkeypatch):
    package = tmp_path / "timm"
    package.mkdir()
    (package / "__init__.py").write_text(f"raise {error}('libtorchvision.so: cannot open shared object file')\n")
    for name in [m for m in sys.modules if m == "timm" or m.startswith("timm.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert register_with_timm() == []


def test_real_timm_builds_medmamba_and_resolves_its_data_config():
    """With the real timm (where it imports: not on the CPU machines here, whose torchvision does not load)."""
    try:
        import timm
        import timm.data
    except Exception as e:  # not installed, or its torchvision fails to load
        pytest.skip(f"timm does not import here: {e!r}")
    register_with_timm()
    assert set(TIMM_MODELS) <= set(timm.list_models("medmamba*"))
    model = timm.create_model("medmamba_t", num_classes=6)
    assert isinstance(model, medmamba.MedMamba)
    assert sum(p.numel() for p in model.parameters()) == 14_457_222
    cfg = timm.data.resolve_data_config({}, model=model)
    assert cfg["input_size"] == (3, 224, 224) and cfg["mean"] == (0.5,) * 3 and cfg["std"] == (0.5,) * 3
    tiny = timm.create_model("medmamba_tiny", num_classes=2, in_chans=1).eval()
    tiny.reset_classifier(3)
    with torch.no_grad():
        assert tiny(torch.randn(2, 1, 28, 28)).shape == (2, 3)
