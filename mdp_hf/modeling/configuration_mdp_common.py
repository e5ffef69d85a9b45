"""What every pruned format's configuration shares: a fingerprint of the fields that define what the model computes.

A pruned model's weights fix its shapes, but several config fields change its outputs without changing any
shape (an activation, a norm epsilon, the attention scaling, where a stride sits, which token is pooled, ...).
Editing one of them in config.json would load silently and compute something else than the model that was
pruned and fine-tuned. So every saved config.json carries ``structure_fingerprint`` (one short hash per such
field, written by ``to_dict``), and loading the config compares it with the values read: a changed field is an
error naming it. A deliberate change: delete ``structure_fingerprint`` from config.json (a config without one,
e.g. saved before fingerprints existed, is not checked).

Self-contained (standard library only): copied next to saved weights with the configuration files that import it.
"""

import hashlib
import json

#: fields that do not change the function of a trained model: provenance, training-only settings, output options
NOT_STRUCTURE = frozenset(
    {
        "structure_fingerprint",
        "preprocessing",
        "base_model_type",
        "base_model_name_or_path",
        "base_config",
        "initializer_range",
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "classifier_dropout_prob",
        "drop_path_rate",
        "dropout_rate",
        # detection training losses (Hungarian matching costs, loss weights): they never change the outputs
        "auxiliary_loss",
        "class_cost",
        "bbox_cost",
        "giou_cost",
        "bbox_loss_coefficient",
        "giou_loss_coefficient",
        "eos_coefficient",
    }
)
#: generic transformers fields that define the function. Not ``num_labels``: from_pretrained(..., num_labels=N)
#: sets it before the check (a deliberate new head), and a changed head no longer fits the weights anyway.
GENERIC_STRUCTURE = ("per_layer_config",)


def structure_values(config, data: dict) -> dict:
    """The structure-defining fields of ``config`` (its class's own fields and ``GENERIC_STRUCTURE``) with their
    values as ``to_dict`` writes them (``data``)."""
    own = vars(type(config)).get("__annotations__", {})
    values = {name: data.get(name) for name in own if name not in NOT_STRUCTURE}
    values.update({name: data[name] for name in GENERIC_STRUCTURE if data.get(name) is not None})
    return values


def _digest(value) -> str:
    # the value as config.json holds it (tuples become lists, mapping keys strings), then in a canonical order
    as_saved = json.loads(json.dumps(value, default=str))
    return hashlib.sha256(json.dumps(as_saved, sort_keys=True).encode()).hexdigest()[:12]


def structure_fingerprint(config, data: dict) -> dict:
    """Field name -> short hash of its value, for every structure-defining field."""
    return {name: _digest(value) for name, value in structure_values(config, data).items()}


class StructureFingerprintMixin:
    """Writes ``structure_fingerprint`` into every serialised config.json (``to_json_string``, which
    ``save_pretrained`` and ``push_to_hub`` use; ``to_dict`` stays free of it, so code that builds a config from
    another one's dict is unaffected) and checks it when a config is built from one (call
    :meth:`check_structure_fingerprint` at the end of ``__post_init__``). Each config class declares the field
    ``structure_fingerprint: dict | None = None`` itself (transformers makes every config class a dataclass of its
    own annotations)."""

    def to_json_string(self, use_diff: bool = True) -> str:
        data = json.loads(super().to_json_string(use_diff))
        data["structure_fingerprint"] = structure_fingerprint(self, super().to_dict())
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def check_structure_fingerprint(self) -> None:
        recorded = getattr(self, "structure_fingerprint", None)
        self.structure_fingerprint = None  # recomputed on every save; a loaded config equals a fresh one
        if not recorded:
            return
        if not isinstance(recorded, dict):
            raise ValueError(f"{type(self).__name__}: structure_fingerprint must be a mapping, got {recorded!r}")
        data = self.to_dict()
        current = structure_fingerprint(self, data)
        changed = sorted(name for name, digest in recorded.items() if name in current and current[name] != digest)
        if changed:
            values = ", ".join(f"{name}={json.dumps(data.get(name), default=str)[:40]}" for name in changed[:6])
            raise ValueError(
                f"{type(self).__name__}: config field(s) {changed} differ from the structure fingerprint recorded when "
                f"this pruned model was saved (now {values}): config.json and the saved model do not match. Where the "
                "weights keep their shapes, the model would load and compute something else than the model that was "
                "pruned and fine-tuned. Restore the saved value(s) (re-export the model from its pruning run), or, if "
                'the change is deliberate, delete "structure_fingerprint" from config.json.'
            )


__all__ = ["StructureFingerprintMixin", "structure_fingerprint", "structure_values"]
