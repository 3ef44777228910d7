//! Prompts as the user turn of a model's chat template (Jinja, as transformers renders
//! it): GGUF files carry one.

/// The chat template of a GGUF file applied to one user turn, ready for the assistant's
/// answer (Jinja, as transformers renders it).
pub fn render_chat(
    template: &str,
    user: &str,
    bos_token: &str,
    eos_token: &str,
) -> Result<String, String> {
    let mut env = minijinja::Environment::new();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |message: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                message,
            ))
        },
    );
    env.add_template("chat", template)
        .map_err(|e| format!("its chat template: {e}"))?;
    let context = minijinja::context! {
        messages => vec![minijinja::context! { role => "user", content => user }],
        add_generation_prompt => true,
        bos_token => bos_token,
        eos_token => eos_token,
    };
    env.get_template("chat")
        .and_then(|t| t.render(context))
        .map_err(|e| format!("its chat template: {e}"))
}
