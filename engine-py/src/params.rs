//! `llmd.SamplingParams`: vLLM's sampling parameters, with its field names, defaults and
//! validation, turned into the engine's [`llmd::SamplingParams`].
//!
//! Fields are stored as Python sees them (signed ints, floats) and may be reassigned after
//! construction, as with vLLM; [`PySamplingParams::to_engine`] validates the whole set again on
//! every use, so an out-of-range value raises `ValueError` naming the field whether it came
//! from the constructor or from an assignment. The range rules are the engine's own
//! ([`llmd::SamplingParams::validate`]); only what Python's types add (negative counts, `n`,
//! vLLM's `top_k = -1`) is checked here.
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyString;

/// The engine's limit on choices per prompt, as the HTTP server's `--max-choices-per-request`.
const MAX_N: i64 = 256;

#[pyclass(module = "llmd", name = "SamplingParams", from_py_object)]
#[derive(Clone, Debug)]
pub struct PySamplingParams {
    #[pyo3(get, set)]
    pub n: i64,
    #[pyo3(get, set)]
    pub temperature: f64,
    #[pyo3(get, set)]
    pub top_p: f64,
    #[pyo3(get, set)]
    pub top_k: i64,
    #[pyo3(get, set)]
    pub min_p: f64,
    #[pyo3(get, set)]
    pub seed: Option<i64>,
    #[pyo3(get, set)]
    pub max_tokens: Option<i64>,
    #[pyo3(get, set)]
    pub min_tokens: i64,
    #[pyo3(get)]
    pub stop: Vec<String>,
    #[pyo3(get, set)]
    pub stop_token_ids: Vec<i64>,
    #[pyo3(get, set)]
    pub ignore_eos: bool,
    #[pyo3(get, set)]
    pub logprobs: Option<i64>,
    #[pyo3(get, set)]
    pub presence_penalty: f64,
    #[pyo3(get, set)]
    pub frequency_penalty: f64,
    #[pyo3(get, set)]
    pub repetition_penalty: f64,
    #[pyo3(get, set)]
    pub skip_special_tokens: bool,
    #[pyo3(get, set)]
    pub include_stop_str_in_output: bool,
}

/// `stop` as vLLM takes it: None, one string, or a list of strings.
fn stop_list(stop: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<String>> {
    match stop {
        None => Ok(Vec::new()),
        Some(s) if s.is_none() => Ok(Vec::new()),
        Some(s) if s.is_instance_of::<PyString>() => Ok(vec![s.extract()?]),
        Some(s) => s
            .extract()
            .map_err(|_| PyTypeError::new_err("stop must be a str or a list of str")),
    }
}

fn invalid(field: &str, reason: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(format!("{field} {reason}"))
}

/// A count that must be >= `min`, as the engine's unsigned type.
fn count(field: &str, value: i64, min: i64) -> PyResult<usize> {
    if value < min {
        return Err(invalid(
            field,
            format!("must be at least {min}, got {value}"),
        ));
    }
    usize::try_from(value).map_err(|_| invalid(field, format!("is too large: {value}")))
}

#[pymethods]
impl PySamplingParams {
    #[new]
    #[pyo3(signature = (
        n = 1,
        temperature = 1.0,
        top_p = 1.0,
        top_k = 0,
        min_p = 0.0,
        seed = None,
        max_tokens = Some(16),
        min_tokens = 0,
        stop = None,
        stop_token_ids = None,
        ignore_eos = false,
        logprobs = None,
        presence_penalty = 0.0,
        frequency_penalty = 0.0,
        repetition_penalty = 1.0,
        skip_special_tokens = true,
        include_stop_str_in_output = false,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        n: i64,
        temperature: f64,
        top_p: f64,
        top_k: i64,
        min_p: f64,
        seed: Option<i64>,
        max_tokens: Option<i64>,
        min_tokens: i64,
        stop: Option<&Bound<'_, PyAny>>,
        stop_token_ids: Option<Vec<i64>>,
        ignore_eos: bool,
        logprobs: Option<i64>,
        presence_penalty: f64,
        frequency_penalty: f64,
        repetition_penalty: f64,
        skip_special_tokens: bool,
        include_stop_str_in_output: bool,
    ) -> PyResult<Self> {
        let p = Self {
            n,
            temperature,
            top_p,
            top_k,
            min_p,
            seed,
            max_tokens,
            min_tokens,
            stop: stop_list(stop)?,
            stop_token_ids: stop_token_ids.unwrap_or_default(),
            ignore_eos,
            logprobs,
            presence_penalty,
            frequency_penalty,
            repetition_penalty,
            skip_special_tokens,
            include_stop_str_in_output,
        };
        p.to_engine()?;
        Ok(p)
    }

    #[setter]
    fn set_stop(&mut self, stop: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        self.stop = stop_list(stop)?;
        Ok(())
    }

    /// A copy (vLLM's `SamplingParams.clone`).
    fn clone(&self) -> Self {
        Clone::clone(self)
    }

    fn __copy__(&self) -> Self {
        Clone::clone(self)
    }

    fn __deepcopy__(&self, _memo: &Bound<'_, PyAny>) -> Self {
        Clone::clone(self)
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other
            .cast::<PySamplingParams>()
            .is_ok_and(|o| format!("{:?}", o.borrow()) == format!("{self:?}"))
    }

    fn __repr__(&self) -> String {
        let opt = |v: Option<i64>| v.map_or("None".to_string(), |v| v.to_string());
        format!(
            "SamplingParams(n={}, presence_penalty={:?}, frequency_penalty={:?}, repetition_penalty={:?}, temperature={:?}, top_p={:?}, top_k={}, min_p={:?}, seed={}, stop={:?}, stop_token_ids={:?}, ignore_eos={}, max_tokens={}, min_tokens={}, logprobs={}, skip_special_tokens={}, include_stop_str_in_output={})",
            self.n,
            self.presence_penalty,
            self.frequency_penalty,
            self.repetition_penalty,
            self.temperature,
            self.top_p,
            self.top_k,
            self.min_p,
            opt(self.seed),
            self.stop,
            self.stop_token_ids,
            if self.ignore_eos { "True" } else { "False" },
            opt(self.max_tokens),
            self.min_tokens,
            opt(self.logprobs),
            if self.skip_special_tokens { "True" } else { "False" },
            if self.include_stop_str_in_output { "True" } else { "False" },
        )
    }
}

impl PySamplingParams {
    /// The engine's parameters and `n`, or `ValueError` naming the first bad field.
    pub fn to_engine(&self) -> PyResult<(llmd::SamplingParams, usize)> {
        let n = count("n", self.n, 1)?;
        if self.n > MAX_N {
            return Err(invalid(
                "n",
                format!("must be at most {MAX_N}, got {}", self.n),
            ));
        }
        // vLLM's convention: 0 or -1 disables top-k.
        let top_k = match self.top_k {
            -1 | 0 => 0,
            k if k > 0 => count("top_k", k, 1)?,
            k => {
                return Err(invalid(
                    "top_k",
                    format!("must be 0 or -1 (disabled), or at least 1, got {k}"),
                ))
            }
        };
        let stop_token_ids = self
            .stop_token_ids
            .iter()
            .map(|&t| {
                u32::try_from(t)
                    .map_err(|_| invalid("stop_token_ids", format!("holds an invalid id {t}")))
            })
            .collect::<PyResult<Vec<_>>>()?;
        let p = llmd::SamplingParams {
            temperature: self.temperature as f32,
            top_p: self.top_p as f32,
            top_k,
            min_p: self.min_p as f32,
            // Any Python int seeds: negative ones by their two's complement.
            seed: self.seed.map(|s| s as u64),
            repetition_penalty: self.repetition_penalty as f32,
            presence_penalty: self.presence_penalty as f32,
            frequency_penalty: self.frequency_penalty as f32,
            max_tokens: self
                .max_tokens
                .map(|m| count("max_tokens", m, 1))
                .transpose()?,
            min_tokens: count("min_tokens", self.min_tokens, 0)?,
            stop: self.stop.clone(),
            stop_token_ids,
            ignore_eos: self.ignore_eos,
            logprobs: self.logprobs.map(|l| count("logprobs", l, 0)).transpose()?,
            include_stop_str_in_output: self.include_stop_str_in_output,
            skip_special_tokens: self.skip_special_tokens,
        };
        p.validate().map_err(|e| match e {
            llmd::sampling::SamplingError::InvalidParam { param, reason } => invalid(param, reason),
        })?;
        Ok((p, n))
    }
}
