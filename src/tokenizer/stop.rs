//! Stop strings over streamed text: where generation must stop, and how much of the tail
//! must be withheld from the stream because it may yet turn into a stop string.
//!
//! All offsets are byte offsets into the request's output text and always fall on char
//! boundaries.

/// The request's stop strings (validated non-empty by `SamplingParams::validate`).
pub struct StopStrings {
    stops: Vec<String>,
    include_stop_str_in_output: bool,
    /// Byte length of the longest stop string (0 when there are none).
    max_len: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopMatch {
    None,
    /// Keep `text[..truncate_to]` and finish the request.
    Stopped {
        truncate_to: usize,
    },
}

impl StopStrings {
    pub fn new(stops: &[String], include_stop_str_in_output: bool) -> Self {
        // Empty strings would match everywhere; validation rejects them, and skipping them
        // here keeps this type safe on its own.
        let stops: Vec<String> = stops.iter().filter(|s| !s.is_empty()).cloned().collect();
        let max_len = stops.iter().map(String::len).max().unwrap_or(0);
        Self {
            stops,
            include_stop_str_in_output,
            max_len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.stops.is_empty()
    }

    /// Looks for a stop string that ends inside this step's new text, which starts at byte
    /// `new_chars_start`: the search starts `max_stop_len - 1` bytes earlier (on a char
    /// boundary), so a stop spanning old and new text is found, while one lying wholly in
    /// old text (already checked, at the step that added its last byte) is not reported
    /// again. The earliest occurrence wins (then the shortest).
    pub fn check(&self, text: &str, new_chars_start: usize) -> StopMatch {
        if self.stops.is_empty() {
            return StopMatch::None;
        }
        let new_start = new_chars_start.min(text.len());
        let mut from = new_start.saturating_sub(self.max_len - 1);
        while !text.is_char_boundary(from) {
            from -= 1;
        }
        let window = &text[from..];
        let mut best: Option<(usize, usize)> = None;
        for stop in &self.stops {
            let Some(start) = first_ending_after(window, stop, new_start - from) else {
                continue;
            };
            let found = (from + start, from + start + stop.len());
            if best.is_none_or(|b| found < b) {
                best = Some(found);
            }
        }
        match best {
            None => StopMatch::None,
            Some((start, end)) => StopMatch::Stopped {
                truncate_to: if self.include_stop_str_in_output {
                    end
                } else {
                    start
                },
            },
        }
    }

    /// How many trailing bytes of `text` to withhold from the stream: the longest suffix
    /// that is a proper prefix of some stop string. Always a char boundary, since a stop
    /// string's prefix that ends on one of its own boundaries starts with a lead byte.
    pub fn holdback(&self, text: &str) -> usize {
        let mut longest = 0;
        for stop in &self.stops {
            let max_k = (stop.len() - 1).min(text.len());
            for k in (longest + 1..=max_k).rev() {
                if stop.is_char_boundary(k) && text.ends_with(&stop[..k]) {
                    longest = k;
                    break;
                }
            }
        }
        longest
    }
}

/// Start of the first occurrence of `needle` in `hay` that ends after byte `after`,
/// overlapping occurrences included (`match_indices` would skip those).
fn first_ending_after(hay: &str, needle: &str, after: usize) -> Option<usize> {
    let mut from = 0;
    while let Some(pos) = hay[from..].find(needle) {
        let start = from + pos;
        if start + needle.len() > after {
            return Some(start);
        }
        // Step one character past this start; `find` returned a char boundary.
        from = start + hay[start..].chars().next().map_or(1, char::len_utf8);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops(list: &[&str], include: bool) -> StopStrings {
        let owned: Vec<String> = list.iter().map(|s| s.to_string()).collect();
        StopStrings::new(&owned, include)
    }

    #[test]
    fn finds_a_stop_spanning_old_and_new_text() {
        // Streamed as "Hello wor" + "ld! more": the stop straddles the chunk boundary.
        let text = "Hello world! more";
        assert_eq!(
            stops(&["world"], false).check(text, 9),
            StopMatch::Stopped { truncate_to: 6 }
        );
        assert_eq!(
            stops(&["world"], true).check(text, 9),
            StopMatch::Stopped { truncate_to: 11 }
        );
        assert_eq!(stops(&["planet"], false).check(text, 9), StopMatch::None);
        assert_eq!(stops(&[], false).check(text, 0), StopMatch::None);
    }

    #[test]
    fn earliest_occurrence_wins_then_shortest() {
        let text = "xx END yy STOP";
        let s = stops(&["STOP", "END", "yy"], false);
        assert_eq!(s.check(text, 0), StopMatch::Stopped { truncate_to: 3 });
        assert_eq!(s.check(text, 8), StopMatch::Stopped { truncate_to: 7 });
        let s = stops(&["abc", "ab"], true);
        assert_eq!(s.check("zabcd", 0), StopMatch::Stopped { truncate_to: 3 });
    }

    #[test]
    fn old_text_outside_the_window_is_not_searched_again() {
        let s = stops(&["STOP"], false);
        assert_eq!(s.check("abc STOP def", 10), StopMatch::None);
        // Ending exactly where the new text starts: found at the previous step, not now.
        assert_eq!(s.check("abc STOP def", 8), StopMatch::None);
        assert_eq!(
            s.check("abc STOP def", 7),
            StopMatch::Stopped { truncate_to: 4 }
        );
        // No new text, nothing new to find.
        assert_eq!(s.check("abc STOP", 8), StopMatch::None);
    }

    #[test]
    fn overlapping_occurrences_are_considered() {
        // "aa" at 0..2 ends before the new text; the overlapping one at 1..3 does not.
        let s = stops(&["aa", "zzzz"], false);
        assert_eq!(s.check("aaa", 2), StopMatch::Stopped { truncate_to: 1 });
    }

    #[test]
    fn multibyte_text_and_stops_stay_on_char_boundaries() {
        let text = "héllo 日本語 done";
        let s = stops(&["日本", "xxxxxxxxxx"], false);
        // Every possible new-text start, including ones whose look-back lands mid-character.
        for start in (0..=text.len()).filter(|&i| text.is_char_boundary(i)) {
            let got = s.check(text, start);
            if start < "héllo 日本".len() {
                assert_eq!(got, StopMatch::Stopped { truncate_to: 7 }, "start {start}");
            } else {
                assert_eq!(got, StopMatch::None, "start {start}");
            }
        }
    }

    #[test]
    fn holdback_is_the_longest_suffix_that_may_start_a_stop() {
        let s = stops(&["STOP", "<|end|>"], false);
        assert_eq!(s.holdback("abc"), 0);
        assert_eq!(s.holdback("abc S"), 1);
        assert_eq!(s.holdback("abc ST"), 2);
        assert_eq!(s.holdback("abc STO"), 3);
        assert_eq!(s.holdback("abc <|en"), 4);
        assert_eq!(s.holdback("STO"), 3);
        assert_eq!(s.holdback(""), 0);
        // A complete stop string is check's business, not a prefix to hold.
        assert_eq!(s.holdback("abc STOP"), 0);
        let s = stops(&["日本語"], false);
        assert_eq!(s.holdback("foo 日本"), "日本".len());
        assert_eq!(s.holdback("foo 日"), "日".len());
        assert_eq!(s.holdback("foo 本"), 0);
        let text = "foo 日本";
        assert!(text.is_char_boundary(text.len() - s.holdback(text)));
    }
}
