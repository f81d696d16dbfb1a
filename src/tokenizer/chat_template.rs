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

/// Work one render may do (minijinja's fuel: about one unit per instruction or per 64 bytes of
/// data built): a template ships with the model and the messages with the request, and without a
/// budget nested loops or a list doubled in a loop hang the rendering thread or exhaust memory.
/// Real templates spend some 25 units per message plus a few per 64 bytes of text: one message
/// as large as the server's 32 MiB body limit, or 100,000 short ones, fit (see the tests), while
/// a runaway template stops within seconds and a few hundred MB.
const RENDER_FUEL: u64 = 5_000_000;

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
        env.set_fuel(Some(RENDER_FUEL));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn user(content: &str) -> ChatMessage {
        ChatMessage {
            role: "user".into(),
            content: content.into(),
        }
    }

    /// Renders `source` on a thread with the default 2 MiB stack (tokio's workers have no more).
    fn render_on_small_stack(source: &str, messages: Vec<ChatMessage>) -> Result<String, String> {
        let source = source.to_string();
        std::thread::spawn(move || {
            let t = ChatTemplate::new(source, Some("<s>".into()), Some("</s>".into()))
                .map_err(|e| e.to_string())?;
            t.render(&messages, true).map_err(|e| e.to_string())
        })
        .join()
        .expect("rendering panicked")
    }

    /// Regression (found by tests/fuzz.rs): these rendered for hours or until memory ran out;
    /// the fuel makes each fail within a bounded amount of work.
    #[test]
    fn endless_templates_run_out_of_fuel() {
        for source in [
            "{% for a in range(100000) %}{% for b in range(100000) %}{{ a }}{% endfor %}{% endfor %}",
            "{% set ns = namespace(s='x') %}{% for i in range(100000) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
            "{% for x in range(100) recursive %}{% if loop.depth < 6 %}{{ loop(range(100)) }}{% endif %}{% endfor %}",
        ] {
            let start = std::time::Instant::now();
            let e = render_on_small_stack(source, vec![user("hi")]).unwrap_err();
            assert!(e.contains("fuel"), "{source}: {e}");
            assert!(start.elapsed().as_secs() < 30, "{source}");
        }
    }

    #[test]
    fn unbounded_recursion_is_an_error_not_a_stack_overflow() {
        for source in [
            "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
            "{% for x in range(10) recursive %}{{ loop(range(10)) }}{% endfor %}",
            "{% include 'chat_template' %}",
            "{% extends 'chat_template' %}",
        ] {
            assert!(
                render_on_small_stack(source, vec![user("hi")]).is_err(),
                "{source}"
            );
        }
    }

    /// The fuel leaves real conversations alone: one message as large as the server's body
    /// limit, and 100,000 short ones.
    #[test]
    fn large_conversations_render_within_the_fuel() {
        let chatml = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
        let big = "word ".repeat((32 << 20) / 5);
        let out = render_on_small_stack(chatml, vec![user(&big)]).unwrap();
        assert!(out.len() > big.len());
        let many = vec![user("Once upon a time there was a little dog."); 100_000];
        render_on_small_stack(chatml, many).unwrap();
    }
}
