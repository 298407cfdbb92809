"""Import paths of earlier releases keep working for one release: each old module re-exports
its names and warns (DeprecationWarning) when imported."""

import importlib
import sys
import warnings

import pytest

import lorasc_kernels
from lorasc_kernels.formats import registry

OLD_MODULES = [
    ("lorasc_kernels.modules", "LoRASCLinear", lorasc_kernels.LoRASCLinear),
    ("lorasc_kernels.dtypes", "WEIGHT_FORMATS", registry.WEIGHT_FORMATS),
    ("lorasc_kernels.dtypes", "scaled_weight_dtype", registry.scaled_weight_dtype),
]


@pytest.mark.parametrize(("old", "name", "new"), OLD_MODULES)
def test_an_old_module_warns_and_re_exports(monkeypatch, old, name, new):
    monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(DeprecationWarning, match=old.replace(".", r"\.")):
        module = importlib.import_module(old)
    assert getattr(module, name) is new


def test_the_cascade_module_path_is_the_cascade_package():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from lorasc_kernels.cascade import Cascade, CascadeSettings

    assert Cascade is lorasc_kernels.Cascade
    assert CascadeSettings is lorasc_kernels.CascadeSettings
