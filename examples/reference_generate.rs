//! Generates with the Rust API and prints what came out as JSON: the reference the Python
//! bindings' tests compare against (`engine-py/tests`), so "the same output as the Rust
//! engine" is checked against the engine itself, never against stored tokens.
//!
//! ```sh
//! cargo run --example reference_generate -- '{"model": "DIR", "prompts": ["Once upon a time"],
//!     "params": {"temperature": 0.8, "seed": 7, "max_tokens": 32}}'
//! ```
//!
//! `prompts` holds strings (text prompts) or lists of token ids; `"chat": true` makes each
//! prompt one user message rendered with the model's chat template. `params` takes the
//! [`SamplingParams`] fields by name. Prints one line: `[{"token_ids": [...], "text": "...",
//! "finish_reason": "...", "num_prompt_tokens": N, "logprobs": [...]}, ...]`, in prompt order.
use anyhow::{bail, Context, Result};
use llmd::tokenizer::ChatMessage;
use llmd::{Engine, EngineConfig, Prompt, SamplingParams};
use serde_json::{json, Value};

fn params(p: &Value) -> Result<SamplingParams> {
    let mut s = SamplingParams::default();
    let Some(fields) = p.as_object() else {
        return Ok(s);
    };
    for (k, v) in fields {
        let f = || v.as_f64().with_context(|| format!("{k}: a number"));
        let u = || {
            v.as_u64()
                .with_context(|| format!("{k}: an unsigned integer"))
        };
        match k.as_str() {
            "temperature" => s.temperature = f()? as f32,
            "top_p" => s.top_p = f()? as f32,
            "top_k" => s.top_k = u()? as usize,
            "min_p" => s.min_p = f()? as f32,
            "seed" => s.seed = Some(u()?),
            "max_tokens" => s.max_tokens = Some(u()? as usize),
            "min_tokens" => s.min_tokens = u()? as usize,
            "repetition_penalty" => s.repetition_penalty = f()? as f32,
            "presence_penalty" => s.presence_penalty = f()? as f32,
            "frequency_penalty" => s.frequency_penalty = f()? as f32,
            "ignore_eos" => s.ignore_eos = v.as_bool().context("ignore_eos: a bool")?,
            "logprobs" => s.logprobs = Some(u()? as usize),
            "stop" => s.stop = serde_json::from_value(v.clone()).context("stop: strings")?,
            "stop_token_ids" => {
                s.stop_token_ids = serde_json::from_value(v.clone()).context("stop_token_ids")?
            }
            other => bail!("unknown parameter {other}"),
        }
    }
    Ok(s)
}

fn main() -> Result<()> {
    let arg = std::env::args()
        .nth(1)
        .context("usage: reference_generate '<json request>'")?;
    let req: Value = serde_json::from_str(&arg).context("the request is not JSON")?;
    let model = req["model"].as_str().context("model: a directory")?;
    let chat = req["chat"].as_bool().unwrap_or(false);
    let prompts = req["prompts"]
        .as_array()
        .context("prompts: a list")?
        .iter()
        .map(|p| match (p, chat) {
            (Value::String(s), true) => Ok(Prompt::Chat(vec![ChatMessage {
                role: "user".into(),
                content: s.clone(),
            }])),
            (Value::String(s), false) => Ok(Prompt::Text(s.clone())),
            (ids, _) => Ok(Prompt::Tokens(
                serde_json::from_value(ids.clone()).context("a prompt of token ids")?,
            )),
        })
        .collect::<Result<Vec<_>>>()?;
    let engine = Engine::new(EngineConfig::new(model))?;
    let outs = engine.generate(prompts, &params(&req["params"])?)?;
    let outs: Vec<Value> = outs
        .into_iter()
        .map(|c| {
            json!({
                "token_ids": c.token_ids,
                "text": c.text,
                "finish_reason": c.finish_reason.as_str(),
                "num_prompt_tokens": c.num_prompt_tokens,
                "logprobs": c.logprobs.iter().map(|l| l.logprob).collect::<Vec<_>>(),
            })
        })
        .collect();
    println!("{}", Value::Array(outs));
    Ok(())
}
