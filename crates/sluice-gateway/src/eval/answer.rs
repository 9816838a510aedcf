//! Reading a model's answer as one label of the label set.
//!
//! The answer is trimmed and compared with each label, ignoring case. If it is none of them
//! exactly, the labels that occur in it as whole words are looked for (a match inside a longer
//! label's match does not count, so `very positive` is not also `positive`): exactly one label
//! found is the prediction; none, or several different ones, make the answer invalid.

use super::metrics::Predicted;

/// The label `answer` names, as an index into `labels`, or [`Predicted::Invalid`].
pub fn predict(answer: &str, labels: &[String]) -> Predicted {
    let answer = answer.trim().to_lowercase();
    let lowered: Vec<String> = labels.iter().map(|l| l.trim().to_lowercase()).collect();
    if let Some(i) = lowered.iter().position(|l| *l == answer) {
        return Predicted::Label(i);
    }
    // (start, end, label) of every whole-word occurrence of every label.
    let mut spans = Vec::new();
    for (i, label) in lowered.iter().enumerate().filter(|(_, l)| !l.is_empty()) {
        for (start, _) in answer.match_indices(label.as_str()) {
            let end = start + label.len();
            let before = answer[..start].chars().next_back();
            let after = answer[end..].chars().next();
            if !before.is_some_and(is_word_char) && !after.is_some_and(is_word_char) {
                spans.push((start, end, i));
            }
        }
    }
    let mut found: Vec<usize> = spans
        .iter()
        .filter(|&&(s, e, _)| !spans.iter().any(|&(s2, e2, _)| s2 <= s && e <= e2 && (e2 - s2) > (e - s)))
        .map(|&(_, _, i)| i)
        .collect();
    found.sort_unstable();
    found.dedup();
    match found.as_slice() {
        [one] => Predicted::Label(*one),
        _ => Predicted::Invalid,
    }
}

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(answer: &str, expect: Option<&str>) {
        let labels: Vec<String> =
            ["positive", "negative", "neutral", "very positive"].iter().map(|s| s.to_string()).collect();
        let got = match predict(answer, &labels) {
            Predicted::Label(i) => Some(labels[i].as_str()),
            Predicted::Invalid | Predicted::Error => None,
        };
        assert_eq!(got, expect, "answer {answer:?}");
    }

    #[test]
    fn answers_are_read_as_one_label_or_invalid() {
        check("positive", Some("positive"));
        check("  NEGATIVE\n", Some("negative"));
        check("Neutral.", Some("neutral"));
        check("The sentiment is: negative", Some("negative"));
        check("\"positive\"", Some("positive"));
        check("Very Positive", Some("very positive"));
        check("it is very positive overall", Some("very positive"));
        check("negative, negative!", Some("negative"));
        check("positive or negative", None);
        check("mixed", None);
        check("", None);
        check("nonpositive", None);
        check("positively", None);
        check("positive_ish", None);
    }
}
