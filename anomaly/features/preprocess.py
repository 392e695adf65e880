"""Record schema checks and preprocessing: raw records -> one float32 matrix for the detectors.

``Preprocessor`` is fit on *normal* records only. It accepts a pandas DataFrame laid out by a
:class:`~anomaly.config.SchemaConfig` (numeric and categorical feature columns; id, time and entity
columns are allowed and ignored) or a 2-D numpy array, whose columns are then named ``f0..fN``.

Numeric columns (``numeric_transform``):

* ``"quantile"`` (default): the training distribution's empirical CDF is mapped onto standard
  normal quantiles, so heavy-tailed amounts and skewed sensor readings both arrive roughly
  Gaussian. Beyond the training range the map continues as ``edge + log1p(excess / scale)`` (scale
  = IQR / 1.349), so a value far outside what training saw still lands further out, by a bounded
  and finite amount, instead of being clamped onto the last quantile.
  Columns with exactly two values in training (indicators) are standardised with their mean and
  standard deviation instead, so that a rare flag lands far from the common one.
* ``"robust"``: ``(x - median) / (IQR / 1.349)``.
* ``"signed_log"``: the robust z-score passed through ``sign(z) * log1p(|z|)``.

Every output is clipped to ``[-clip, clip]`` so nothing downstream ever sees inf.

``linear_view`` gives the same matrix with every quantile-mapped column as its plain z-score
(``anomaly.features.linear_view``), the view of the ensemble's second neighbour detector.

A constant numeric column (IQR and standard deviation both zero) is kept, with a warning: it maps to
0 for the training value, and any other value at scoring time is a value none of the n training
rows showed. By the rule of succession its probability is about p = 1/(n+2), so the column is
scaled like an indicator of that rarity (scale sqrt(p(1-p))): a unit deviation lands about
sqrt(n) out (at the clip from about 400 rows on), as a flag that training never raised.

Categorical columns are one-hot encoded over the categories seen in training (at most
``max_categories``, the most frequent; values are compared as text, an integer-valued number as an
integer whatever its dtype: ``anomaly.features.categories``) plus one ``__unseen__`` bucket that
takes new categories and categories cut by ``max_categories``. Where no training row fell in that
bucket, a category training never showed sets it not to 1 but to 1/sqrt(p(1-p)) with p = 1/(n+2)
(clipped), as a constant column's new value is scaled. At 1, a purchase in a merchant category no
card had used was one mismatch, as far from its neighbours as an ordinary purchase in a rarely
combined category, and the neighbour detectors missed it: in the fraud example (30,000 training
rows, target 0.001) the ensemble alerted on 5% of those purchases before the flag and on 100% with
it, no other kind of anomaly changed.

A missing category under ``impute`` takes the column's most frequent training category, as a missing
number takes the training median: imputing says an absent value is not evidence. In the unseen
bucket, where it went before, it set a column that hardly any training row had set, and the
detectors alerted on nearly every such row. Bundles saved before keep that, as they were
calibrated; a column with no training value at all still sends a missing value there.

Missing values follow ``schema.missing``: ``"impute"`` fills numeric values with the training median
and categorical ones with the most frequent training category; ``"reject"`` raises ``DataError``
naming the row and column. ``validate_frame`` reports per-row problems without raising, so the
streaming service can dead-letter bad rows before scoring the rest.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from anomaly.config import SchemaConfig
from anomaly.errors import DataError, NotFittedError
from anomaly.features.categories import CategoryLookup, fit_categorical
from anomaly.features.columns import (
    arrow_strings,
    bad_value,
    finite_or_missing_column,
    row_problems,
    to_frame,
)
from anomaly.features.knot_lookup import KnotLookup, row_sized_ufunc_buffers
from anomaly.features.linear_view import LinearPlan
from anomaly.features.numeric import (
    NUMERIC_TRANSFORMS,
    NumericBlockTransform,
    NumericParams,
    fit_numeric_params,
    never_seen_scale,
)

UNSEEN = "__unseen__"
# Rows per step of the block transform: its 2-D temporaries (rows x numeric columns) stay in the
# CPU cache between the dozen passes over them instead of streaming through memory each time.
BLOCK_ROWS = 2048


class Preprocessor:
    """Turns records into a float32 matrix; see the module docstring for the rules.

    Parameters
    ----------
    schema:
        Feature columns and missing-value policy. ``None`` treats every column as numeric (the
        numpy-array case) with ``missing="impute"``.
    numeric_transform:
        ``"quantile"`` (default), ``"robust"`` or ``"signed_log"``.
    n_quantiles:
        Number of quantile knots kept per numeric column.
    max_categories:
        Largest one-hot vocabulary per categorical column; rarer categories go to ``__unseen__``.
    clip:
        Bound on every transformed value.
    min_rows:
        Fewer training rows than this is a ``DataError``.
    """

    def __init__(
        self,
        schema: SchemaConfig | None = None,
        numeric_transform: str = "quantile",
        n_quantiles: int = 1000,
        max_categories: int = 50,
        clip: float = 20.0,
        min_rows: int = 20,
    ) -> None:
        if numeric_transform not in NUMERIC_TRANSFORMS:
            raise ValueError(f"numeric_transform must be one of {NUMERIC_TRANSFORMS}")
        self.schema = schema
        self.numeric_transform = numeric_transform
        self.n_quantiles = n_quantiles
        self.max_categories = max_categories
        self.clip = clip
        self.min_rows = min_rows

    # ------------------------------------------------------------------ fitting
    def fit(self, data: Any) -> Preprocessor:
        frame = to_frame(data, self._schema_feature_names())
        if len(frame) == 0:
            raise DataError("no records to train on: the input is empty")
        self.missing_ = "impute" if self.schema is None else self.schema.missing
        if self.schema is None or not self.schema.features:
            self.numeric_ = [str(c) for c in frame.columns]
            self.categorical_: list[str] = []
        else:
            self.numeric_ = list(self.schema.numeric)
            self.categorical_ = list(self.schema.categorical)
        self._check_columns(frame)
        if len(frame) < self.min_rows:
            raise DataError(
                f"only {len(frame)} training records; at least {self.min_rows} are needed"
            )
        self.numeric_params_: dict[str, NumericParams] = {}
        for name in self.numeric_:
            values = finite_or_missing_column(frame, name)
            finite = values[~np.isnan(values)]
            if self.missing_ == "reject" and len(finite) < len(values):
                raise bad_value(frame, name, np.isnan(values), "missing")
            if len(finite) == 0:
                raise DataError(f"column '{name}': every training value is missing")
            self.numeric_params_[name] = fit_numeric_params(
                name, finite, self.numeric_transform, self.n_quantiles
            )
        # What a category training never showed sets in its column's unseen bucket: a flag of
        # its rarity where the bucket took no training row (module docstring), else 1.
        rare = min(1.0 / never_seen_scale(len(frame)), self.clip)
        fitted = fit_categorical(
            frame, self.categorical_, self.max_categories, self.missing_ == "impute", rare
        )
        self.categories_, self.impute_category_, self.unseen_value_, lookups = fitted
        self._build_output_layout(lookups)
        return self

    def _build_output_layout(self, lookups: dict[str, CategoryLookup]) -> None:
        names = list(self.numeric_)
        source = list(range(len(self.numeric_)))
        for j, name in enumerate(self.categorical_, start=len(self.numeric_)):
            for cat in [*self.categories_[name], UNSEEN]:
                names.append(f"{name}={cat}")
                source.append(j)
        self.feature_names_in_ = [*self.numeric_, *self.categorical_]
        self.feature_names_out_ = names
        # For each output column, the input feature it came from (explanations sum over these).
        self.output_source_ = np.asarray(source, dtype=np.int64)
        self.n_features_out_ = len(names)
        self._numeric_block_transform: NumericBlockTransform | None = None
        self._linear_plan: LinearPlan | None = None
        self._category_lookups = lookups
        # The code a missing value takes under impute: its column's most frequent category.
        self._impute_codes = {
            name: self.categories_[name].index(mode) for name, mode in self.impute_category_.items()
        }
        # Per categorical feature, the value each ``category_codes`` code sets in its one-hot
        # block: 1 for a training category and the bucket, the rarity flag for a new category.
        self.one_hot_values_ = {
            name: np.array(
                [1.0] * (len(self.categories_[name]) + 1) + [self.unseen_value_[name]],
                dtype=np.float32,
            )
            for name in self.categorical_
        }

    # ---------------------------------------------------------------- checking
    def _schema_feature_names(self) -> list[str] | None:
        if hasattr(self, "feature_names_in_"):
            return self.feature_names_in_
        if self.schema is not None and self.schema.features:
            return self.schema.features
        return None

    def _check_fitted(self) -> None:
        if not hasattr(self, "feature_names_out_"):
            raise NotFittedError("the preprocessor is not fitted yet: call fit() first")

    def _check_columns(self, frame: pd.DataFrame) -> None:
        expected = [*self.numeric_, *self.categorical_]
        present = {str(c) for c in frame.columns}
        missing = [c for c in expected if c not in present]
        if missing:
            raise DataError(
                f"missing column(s): {', '.join(missing)} (the schema expects "
                f"{', '.join(expected[:20])}{'...' if len(expected) > 20 else ''})"
            )
        if self.schema is not None and self.schema.features:
            schema = self.schema
            allowed = {*expected, schema.id_field, schema.time_field, schema.entity_field}
            extra = sorted(str(c) for c in frame.columns if str(c) not in allowed)
            if extra:
                raise DataError(
                    f"unexpected column(s) not in the schema: {', '.join(extra[:20])} "
                    "(add them to schema.numeric or schema.categorical, or drop them)"
                )

    def validate_frame(self, data: Any) -> list[tuple[int, str, str]]:
        """Per-row problems as ``(row_position, error_kind, message)``, without raising.

        ``row_position`` is the 0-based position in ``data`` (not the index label). Kinds:
        ``missing_column``, ``not_a_number``, ``infinite``, ``missing_value`` (only when the
        policy is ``reject``). A missing column makes every row an error. Extra columns are
        not an error here (a stream may carry more fields than the model uses).
        """
        self._check_fitted()
        frame = to_frame(data, self.feature_names_in_)
        present = {str(c) for c in frame.columns}
        missing_cols = [c for c in self.feature_names_in_ if c not in present]
        if missing_cols:
            msg = f"missing field(s): {', '.join(missing_cols)}"
            return [(i, "missing_column", msg) for i in range(len(frame))]
        reject = self.missing_ == "reject"
        if self._clean(frame, reject):
            return []
        return row_problems(frame, self.numeric_, self.categorical_, reject)

    def _clean(self, frame: pd.DataFrame, reject: bool) -> bool:
        """True when ``validate_frame`` has nothing to report, found in one pass over the
        numeric block (plain NumPy columns hold no text) and, under ``reject``, the null counts
        of the categorical columns; False when it cannot tell that way (the per-column checks
        then decide)."""
        block = self._numeric_block(frame)
        if block is None and self.numeric_:
            return False
        # Not all finite is still clean where only values are missing and the policy allows it.
        if block is not None and not np.isfinite(block).all() and (reject or np.isinf(block).any()):
            return False
        if reject:
            for name in self.categorical_:
                column = frame[name]
                arrow = arrow_strings(column)
                if arrow is not None:
                    if arrow.null_count:
                        return False
                elif column.dtype != object or pd.isna(column.to_numpy()).any():
                    return False
        return True

    # -------------------------------------------------------------- transforming
    def transform(self, data: Any) -> np.ndarray:
        """Records -> float32 matrix ``(n_rows, n_features_out_)``; bad input raises DataError."""
        return self.transform_with_numeric(data)[0]

    def transform_with_numeric(self, data: Any) -> tuple[np.ndarray, np.ndarray]:
        """``transform``, and the checked numeric features it read (``(rows, numeric_)``, NaN
        where missing, before imputation; not always float64), which the drift monitor counts
        without extracting them from the frame a second time."""
        frame = self.checked_frame(data)
        n = len(frame)
        # Filled column by column, so column-major (contiguous writes; row-major took ~1 ms per
        # column per 100k rows); returned row-major, as the networks want it.
        out = np.empty((n, self.n_features_out_), dtype=np.float32, order="F")
        block = self._numeric_block(frame)
        if block is None:  # text or nullable columns: extracted and checked one at a time
            block = self._checked_numeric_columns(frame)
        self._transform_numeric_block(frame, block, out)
        col = len(self.numeric_)
        for name, codes in zip(self.categorical_, self.category_codes(frame), strict=True):
            width = len(self.categories_[name]) + 1
            one_hot = out[:, col : col + width]
            one_hot[:] = 0.0
            one_hot[np.arange(n), np.minimum(codes, width - 1)] = self.one_hot_values_[name][codes]
            col += width
        return np.ascontiguousarray(out), block

    # The host's part of transform, for scoring paths that do the arithmetic elsewhere (the GPU
    # path of anomaly.scoring.device_scoring): the same checks and errors, nothing transformed.
    def checked_frame(self, data: Any) -> pd.DataFrame:
        """``data`` as a frame holding every input feature (DataError naming the missing ones)."""
        self._check_fitted()
        frame = to_frame(data, self.feature_names_in_)
        present = {str(c) for c in frame.columns}
        missing_cols = [c for c in self.feature_names_in_ if c not in present]
        if missing_cols:
            raise DataError(f"missing column(s): {', '.join(missing_cols)}")
        return frame

    def checked_numeric(self, frame: pd.DataFrame) -> np.ndarray:
        """The numeric features as float64 ``(rows, columns)``, NaN where missing, after the
        checks ``transform`` makes (text, infinite, missing under ``reject``), same errors."""
        block = self._numeric_block(frame)
        if block is None:
            return self._checked_numeric_columns(frame)
        values = np.asarray(block, dtype=np.float64)
        self._missing_after_checks(frame, values, values.T)
        return values

    def category_codes(self, frame: pd.DataFrame) -> list[np.ndarray]:
        """Per categorical feature, each row's code, after the missing-value check under
        ``reject``: its position in the one-hot block for a training category (0 to V-1, V the
        vocabulary's size), for a missing value that of the most frequent training category
        (``impute_category_``; V, the unseen bucket, where there is none, as in bundles saved
        before it), V + 1 for a category training never showed (the unseen bucket too, set to
        ``unseen_value_``)."""
        out = []
        for name in self.categorical_:
            codes, missing = self._category_lookups[name].codes(frame[name])
            if self.missing_ == "reject" and missing:
                raise bad_value(frame, name, frame[name].isna().to_numpy(), "missing")
            outside = codes < 0
            if outside.any():
                new = outside & ~frame[name].isna().to_numpy() if missing else outside
                codes[outside] = len(self.categories_[name])
                codes[new] += 1
                if missing and name in self._impute_codes:
                    codes[outside & ~new] = self._impute_codes[name]
            out.append(codes)
        return out

    def fit_transform(self, data: Any) -> np.ndarray:
        return self.fit(data).transform(data)

    def _checked_numeric_columns(self, frame: pd.DataFrame) -> np.ndarray:
        """Column by column, any dtype: float64, NaN where missing; errors in column order.
        Column-major, as ``_numeric_block`` gives it: each feature's values contiguous."""
        values = np.empty((len(frame), len(self.numeric_)), dtype=np.float64, order="F")
        for i, name in enumerate(self.numeric_):
            column = finite_or_missing_column(frame, name)
            if self.missing_ == "reject" and np.isnan(column).any():
                raise bad_value(frame, name, np.isnan(column), "missing")
            values[:, i] = column
        return values

    def _numeric_block(self, frame: pd.DataFrame) -> np.ndarray | None:
        """The numeric features as one ``(rows, columns)`` array, or None unless every one is a
        plain NumPy bool, integer or float column (those hold no text or NA to report, and
        convert to float64 exactly as ``_checked_numeric_columns`` converts them). Columns of
        one dtype come as they are (for a single block, without a copy), others as float64."""
        if not self.numeric_:
            return None
        labels = frame.columns.tolist()
        if labels == self.numeric_:
            positions = None  # a numpy array's frame: no selection
        else:
            where = {label: i for i, label in enumerate(labels)}
            if len(where) != len(labels) or any(name not in where for name in self.numeric_):
                return None  # duplicate or non-string labels: the per-column checks decide
            positions = [where[name] for name in self.numeric_]
        all_dtypes = frame.dtypes.tolist()
        dtypes = all_dtypes if positions is None else [all_dtypes[i] for i in positions]
        if not all(isinstance(d, np.dtype) and d.kind in "biuf" for d in dtypes):
            return None
        numeric = frame if positions is None else frame.take(positions, axis=1)
        if len(set(dtypes)) == 1:
            return numeric.to_numpy()
        return numeric.to_numpy(dtype=np.float64)

    def _transform_numeric_block(
        self, frame: pd.DataFrame, block: np.ndarray, out: np.ndarray
    ) -> None:
        """The numeric features of ``block`` (rows x columns) into ``out``: missing values take
        the column's median, then ``NumericBlockTransform``; errors as the per-column checks.

        Worked on transposed, one feature per row: the block and ``out`` are column-major, so
        each feature's values stay contiguous."""
        plan = self._block_plan()
        xt = block.T
        zt = out[:, : len(self.numeric_)].T
        n = xt.shape[1]
        for r0 in range(0, n, BLOCK_ROWS):
            # As float64, each feature's values contiguous: a row-major array's frame gives them
            # strided, and one small transposing copy per chunk beats a dozen strided passes.
            x = np.ascontiguousarray(xt[:, r0 : r0 + BLOCK_ROWS], dtype=np.float64)
            with row_sized_ufunc_buffers(x.shape[1]):
                nan = self._missing_after_checks(frame, x, xt)
                if nan is not None:
                    x = np.where(nan, plan.median, x)
                zt[:, r0 : r0 + BLOCK_ROWS] = plan(x)

    def _missing_after_checks(
        self, frame: pd.DataFrame, x: np.ndarray, xt: np.ndarray
    ) -> np.ndarray | None:
        """None when ``x`` (part of the numeric block ``xt``, one feature per row) is all finite;
        else its NaN mask, once no value is infinite and none is missing under ``reject`` (the
        first such, in the whole block, is raised as the per-column checks raise it)."""
        if np.isfinite(x).all():
            return None
        nan = np.isnan(x)
        if np.isinf(x).any() or (self.missing_ == "reject" and nan.any()):
            self._raise_first_bad_value(frame, xt)
        return nan

    def _raise_first_bad_value(self, frame: pd.DataFrame, xt: np.ndarray) -> None:
        """The DataError the per-column checks raise: first bad column, then first bad row."""
        for name, column in zip(self.numeric_, xt, strict=True):
            values = np.asarray(column, dtype=np.float64)
            if np.isinf(values).any():
                raise bad_value(frame, name, np.isinf(values), "infinite")
            if self.missing_ == "reject" and np.isnan(values).any():
                raise bad_value(frame, name, np.isnan(values), "missing")

    def _block_plan(self) -> NumericBlockTransform:
        # Derived on first use and never saved, as the knot lookups it is built from.
        if self._numeric_block_transform is None:
            params = [self.numeric_params_[name] for name in self.numeric_]
            lookups = {
                i: KnotLookup(np.asarray(p.knots), np.asarray(p.normal), p.median, p.scale)
                for i, p in enumerate(params)
                if self.numeric_transform == "quantile" and len(p.knots) > 1
            }
            self._numeric_block_transform = NumericBlockTransform(
                params, lookups, self.numeric_transform == "signed_log", self.clip
            )
        return self._numeric_block_transform

    # ------------------------------------------------------------ the linear view
    def linear_view(self, xp: np.ndarray, numeric: np.ndarray) -> np.ndarray:
        """``xp`` (this preprocessor's output for some rows) with each quantile-mapped numeric
        column as its training z-score, from ``numeric``, the checked numeric block
        ``transform_with_numeric`` returned for the same rows (``anomaly.features.linear_view``)."""
        return self.linear_plan().apply(xp, numeric, self.clip)

    def linear_plan(self) -> LinearPlan:
        """What the linear view replaces (DataError for parameters from before the view)."""
        self._check_fitted()
        if self._linear_plan is None:
            params = [self.numeric_params_[name] for name in self.numeric_]
            self._linear_plan = LinearPlan.from_params(params, self.numeric_transform == "quantile")
        return self._linear_plan

    # ------------------------------------------------------------ (de)serialising
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe parameters (stored in the bundle manifest)."""
        self._check_fitted()
        return {
            "numeric_transform": self.numeric_transform,
            "n_quantiles": self.n_quantiles,
            "max_categories": self.max_categories,
            "clip": self.clip,
            "min_rows": self.min_rows,
            "missing": self.missing_,
            "numeric": self.numeric_,
            "categorical": self.categorical_,
            "numeric_params": {k: v.to_dict() for k, v in self.numeric_params_.items()},
            "categories": self.categories_,
            "unseen_values": self.unseen_value_,
            "impute_categories": self.impute_category_,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], schema: SchemaConfig | None = None) -> Preprocessor:
        pre = cls(
            schema=schema,
            numeric_transform=data["numeric_transform"],
            n_quantiles=int(data["n_quantiles"]),
            max_categories=int(data["max_categories"]),
            clip=float(data["clip"]),
            min_rows=int(data["min_rows"]),
        )
        pre.missing_ = data["missing"]
        pre.numeric_ = [str(c) for c in data["numeric"]]
        pre.categorical_ = [str(c) for c in data["categorical"]]
        pre.numeric_params_ = {
            k: NumericParams.from_dict(v) for k, v in data["numeric_params"].items()
        }
        pre.categories_ = {k: [str(c) for c in v] for k, v in data["categories"].items()}
        # Bundles saved before the rarity flag set 1 for a new category too, as calibrated.
        unseen = data.get("unseen_values") or {}
        pre.unseen_value_ = {k: float(unseen.get(k, 1.0)) for k in pre.categorical_}
        # Bundles saved before categorical imputation put a missing category in the unseen
        # bucket, as calibrated: without the key they still do.
        impute = data.get("impute_categories") or {}
        pre.impute_category_ = {str(k): str(v) for k, v in impute.items()}
        if set(pre.numeric_params_) != set(pre.numeric_) or set(pre.categories_) != set(
            pre.categorical_
        ):
            raise DataError("preprocessing parameters do not match the listed columns")
        if any(
            pre.categories_.get(k) is None or v not in pre.categories_[k]
            for k, v in pre.impute_category_.items()
        ):
            raise DataError("an imputed category is not in its column's vocabulary")
        pre._build_output_layout({k: CategoryLookup(pre.categories_[k]) for k in pre.categorical_})
        return pre
