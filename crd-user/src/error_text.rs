//! An error as one line of text, for the terminal, the service's replies and the errors
//! that carry another library's message (aya's, whose kernel answer is in its causes).

/// The error and its causes on one line, skipping causes the message already quotes.
pub fn one_line(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut next = error.source();
    while let Some(cause) = next {
        let cause_text = cause.to_string();
        if !line.contains(&cause_text) {
            line = format!("{line}: {cause_text}");
        }
        next = cause.source();
    }
    line
}
