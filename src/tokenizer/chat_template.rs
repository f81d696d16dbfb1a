//! A model's Jinja chat template, compiled once, rendered the way transformers renders it.
//!
//! transformers compiles templates with `trim_blocks` and `lstrip_blocks` on and lets them
//! call Python string methods (`.strip()`, `.startswith()`, ...); minijinja gets the same
//! whitespace rules and minijinja-contrib's pycompat methods, so a template renders to the
//! same bytes here as in Python. `raise_exception(msg)` fails rendering with
//! [`TokenizerError::TemplateException`] carrying `msg`.
use std::collections::BTreeMap;

use minijinja::syntax::SyntaxConfig;
use minijinja::{Environment, Error, ErrorKind, Value};

use super::{ChatMessage, TokenizerError};

const TEMPLATE_NAME: &str = "chat_template";

pub(super) struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

/// Marks an error as the template's own `raise_exception`, so it can be told apart from
/// syntax or runtime errors after minijinja has wrapped it.
#[derive(Debug)]
struct RaisedException(String);

impl std::fmt::Display for RaisedException {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedException {}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message.clone())
        .with_source(RaisedException(message)))
}

impl ChatTemplate {
    pub(super) fn new(
        source: String,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, TokenizerError> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(template_error)?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned(TEMPLATE_NAME, source)
            .map_err(template_error)?;
        Ok(Self {
            env,
            bos_token,
            eos_token,
        })
    }

    pub(super) fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(template_error)?;
        let mut ctx: BTreeMap<&str, Value> = BTreeMap::new();
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                Value::from_pairs([
                    ("role", Value::from(m.role.as_str())),
                    ("content", Value::from(m.content.as_str())),
                ])
            })
            .collect();
        ctx.insert("messages", Value::from(messages));
        ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
        // Absent special tokens stay undefined (render as ""), as in transformers.
        if let Some(bos) = &self.bos_token {
            ctx.insert("bos_token", Value::from(bos.as_str()));
        }
        if let Some(eos) = &self.eos_token {
            ctx.insert("eos_token", Value::from(eos.as_str()));
        }
        template
            .render(Value::from_pairs(ctx))
            .map_err(template_error)
    }
}

fn template_error(e: Error) -> TokenizerError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(err) = cause {
        if let Some(raised) = err.downcast_ref::<RaisedException>() {
            return TokenizerError::TemplateException {
                message: raised.0.clone(),
            };
        }
        cause = err.source();
    }
    TokenizerError::Template {
        message: e.to_string(),
    }
}
