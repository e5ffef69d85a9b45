"""Top-1 accuracy as an `evaluate` metric module, shipped with mdp_hf so it loads offline:

    evaluate.load(mdp_hf.metrics.ACCURACY_PATH)

(``evaluate.load("accuracy")`` fetches the module from the Hub and fails without network.)
"""

import datasets
import evaluate

_DESCRIPTION = "Top-1 accuracy: the fraction of predictions equal to the reference label."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): ground-truth labels.
Returns:
    accuracy (float): in [0, 1].
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
        if not predictions:
            raise ValueError("accuracy of an empty evaluation set is undefined")
        correct = sum(int(p) == int(r) for p, r in zip(predictions, references))
        return {"accuracy": correct / len(predictions)}
