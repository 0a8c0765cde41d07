"""The review page of a run: ``review/index.html`` with the metrics, the subjects and a 3D viewer (NiiVue)."""

from octa3d.review.page import write_explain_review, write_page, write_predict_review, write_test_review

__all__ = ["write_explain_review", "write_page", "write_predict_review", "write_test_review"]
