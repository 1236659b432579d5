"""The layering of the package holds: plain-torch modules never pull in Lightning, callbacks never the GPT or the
training modules, and the training modules never the callbacks (they share only the run state and the adapter)."""
import json
import subprocess
import sys

PLAIN = ["common", "model", "loss", "optim", "schedules", "tokenizer", "checkpoint", "engine", "eval.bpb", "eval.core",
         "sharded", "data.corpus", "data.shards", "data.loader", "data.chat", "data.tasks",
         "sample", "chat_cli", "eval.base_loss", "hf", "eval.chat", "eval.execution", "data.sft",
         # the 2026 recipe's plain-torch half
         "model2026", "attention", "optim2026", "sharded2026", "recipe2026", "data.bestfit", "data.offline_chat"]

# In a fresh interpreter: import the modules one by one and record what each brought in, so the first module
# that pulls in a forbidden package is the one named.
PROBE = """
import importlib, json, sys
modules, prefixes = sys.argv[1].split(","), tuple(sys.argv[2].split(","))
loaded = {}
for name in modules:
    importlib.import_module(name)
    loaded[name] = sorted(m for m in sys.modules if m.startswith(prefixes))
print(json.dumps(loaded))
"""


def probe(modules: list[str], prefixes: tuple[str, ...]) -> dict[str, list[str]]:
    out = subprocess.run([sys.executable, "-c", PROBE, ",".join(modules), ",".join(prefixes)], capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out)


def test_plain_torch_layers_do_not_import_lightning():
    loaded = probe([f"nanolit.{m}" for m in PLAIN], ("lightning", "torchmetrics"))
    assert list(loaded) == [f"nanolit.{m}" for m in PLAIN]
    assert {m: found for m, found in loaded.items() if found} == {}


def test_callbacks_do_not_import_the_gpt():
    loaded = probe(["nanolit.callbacks"], ("nanolit.",))["nanolit.callbacks"]
    assert "nanolit.callbacks.ema_loss" in loaded  # the import really happened
    forbidden = ("nanolit.model", "nanolit.module", "nanolit.midtrain", "nanolit.loss", "nanolit.optim",
                 "nanolit.sharded", "nanolit.data.datamodule")
    assert [m for m in loaded if m in forbidden] == []


def test_training_modules_do_not_import_the_callbacks():
    loaded = probe(["nanolit.module", "nanolit.midtrain"], ("nanolit.",))
    assert "nanolit.runstate" in loaded["nanolit.module"]  # what they do share
    assert {name: [m for m in found if m.startswith("nanolit.callbacks")] for name, found in loaded.items()} == {
        "nanolit.module": [], "nanolit.midtrain": []}
