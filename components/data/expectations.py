"""The expectation suite of a dataset: what is checked, each with the sentence Data Docs shows.

All on the data's own columns where GX has a built-in (label set, per-label counts, text length,
uniqueness); see components/data/validation.py for how the suite is run and reported.
"""
from __future__ import annotations

from typing import Any

BLANK_TEXT = r"^[\s\x00-\x1f\x7f-\x9f]*$"  # nothing printable: what normalise_text turns into ""


def _sentence(text: str) -> str:
    """A Data Docs description: GX renders it as a string template, so a literal $ is doubled."""
    return text.replace("$", "$$")


def build_expectations(labels: list[str], thresholds: dict[str, Any]) -> list[Any]:
    """Return the suite's expectations: each has a `description` (the sentence Data Docs shows), `notes`
    (why it matters, and what a derived column holds) and `meta` (check, split, intent; label).

    Args:
        labels: The labels of labels.yaml.
        thresholds: min_per_label, max_dup_rate, min_chars, max_chars.

    Returns:
        GX expectation objects, in the order they are reported.
    """
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    train, test = Column("split") == "train", Column("split") == "test"
    least, rate = thresholds["min_per_label"], thresholds["max_dup_rate"]

    def about(check: str, split: str, intent: str, description: str, *notes: str, **more: str) -> dict[str, Any]:
        return {"meta": {"check": check, "split": split, "intent": intent, **more},
                "description": _sentence(description), "notes": list(notes) or None}
    duplicates = ("No text occurs twice within a split" if not rate else
                  f"At most {rate:.1%} of a split's rows share their text with another row of the split")
    return [
        gxe.ExpectColumnValuesToBeNull(column="record_problem", **about(
            "records", "all", "every line is a JSON object with string id, text, label",
            "Every line of train.jsonl and test.jsonl is a JSON object with a string id, text and label.",
            "`record_problem` is derived: why a line is not such a record (not JSON, not an object, a field "
            "missing or not a string); it is empty for a good line. GX has no expectation on raw JSON lines.")),
        gxe.ExpectColumnValuesToBeNull(column="encoding_problem", **about(
            "utf8", "all", "every line is valid UTF-8", "Every line is valid UTF-8.",
            "`encoding_problem` is derived: what is wrong with a line's encoding (bytes that are not UTF-8, or "
            "a JSON escape of a lone surrogate that UTF-8 cannot encode); it is empty for a good line.")),
        gxe.ExpectColumnValuesToNotMatchRegex(column="text", regex=BLANK_TEXT, **about(
            "text_nonempty", "all", "text is not empty or whitespace",
            "Every text has printable content: not empty, not only whitespace or control characters.",
            "An empty text carries no signal to classify.")),
        gxe.ExpectColumnValueLengthsToBeBetween(
            column="text", min_value=thresholds["min_chars"], max_value=thresholds["max_chars"], **about(
                "text_length", "all", "text length is within bounds",
                f"Every text is {thresholds['min_chars']:,} to {thresholds['max_chars']:,} characters long.",
                "A text far longer than the dataset's longest means records were merged (e.g. by broken CSV "
                "quoting); the bound is set per dataset in components/data/sources.py (DATASETS)."))
    ] + [
        gxe.ExpectColumnValuesToBeInSet(column="label", value_set=labels, **about(
            "labels_known", "all", "labels are those of labels.yaml",
            f"Every label is one of the {len(labels)} labels of labels.yaml: {', '.join(labels)}.",
            "A label outside labels.yaml can never be predicted and is a typo or a stale file.")),
        gxe.ExpectColumnDistinctValuesToContainSet(column="label", value_set=labels, row_condition=train, **about(
            "labels_in_train", "train", "every label occurs in train",
            "Every label of labels.yaml occurs in train.",
            "A label with no training example cannot be learnt.")),
    ] + [
        gxe.ExpectTableRowCountToBeBetween(min_value=least, row_condition=train & (Column("label") == label), **about(
            "min_per_label", "train", "enough training examples per label",
            f"Train has at least {least} examples labelled {label}.",
            f"Fewer than {least} examples of a label are too few to learn it from; the observed value is "
            "the label's count in train.", label=label))
        for label in labels
    ] + [
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["split", "id"], ignore_row_if="any_value_is_missing", **about(
            "ids_unique", "all", "ids are unique within a split", "Every id occurs once within its split.",
            "Predictions and the gate's validation slice are keyed by id.")),
        gxe.ExpectCompoundColumnsToBeUnique(
            column_list=["split", "text_normalised"], mostly=1 - rate, ignore_row_if="any_value_is_missing", **about(
                "duplicates", "all", "duplicate rate within a split is bounded", duplicates + ".",
                "`text_normalised` is the text as builds deduplicate it: whitespace collapsed and control "
                "characters dropped. Builds remove duplicates, so one here means the files were altered; "
                "every copy of a repeated text counts.")),
        gxe.ExpectColumnValuesToBeNull(column="train_copy_id", row_condition=test, **about(
            "no_leak", "test", "no test text appears in train",
            "No test text also occurs in train.",
            "`train_copy_id` is derived: on a test row, the id of a train row with the same normalised text "
            "(empty when there is none). A test text seen in training inflates the test score (a leak).")),
    ]
