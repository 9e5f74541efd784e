//! Typed-line reconstruction from what a client sends on a PTY channel. **Heuristic, an audit aid**: a carriage
//! return or newline ends a line, DEL/BS erase a character, ^U and ^C clear the line, ^W erases a word; escape
//! sequences (arrow keys, bracketed paste markers) are skipped. It misses readline history, tab completion and
//! full-screen editors, and it sees passwords typed at `sudo` prompts (the gateway cannot see the remote tty's
//! ECHO flag) — which is why input capture is opt-in and its lines are sealed like other sensitive fields.
#![deny(unsafe_code)]

/// A line longer than this is cut (and flagged) rather than grown without bound.
pub const MAX_LINE: usize = 4096;

#[derive(Debug, Default)]
pub struct LineAssembler {
    line: Vec<u8>,
    escape: Escape,
    overflowed: bool,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Escape {
    #[default]
    None,
    /// Saw ESC.
    Start,
    /// Inside `ESC [ …` until a final byte 0x40..=0x7e.
    Csi,
    /// `ESC O x` (SS3): one more byte.
    Ss3,
}

impl LineAssembler {
    /// Feeds client bytes; calls `done` with each completed, non-empty line.
    pub fn push(&mut self, data: &[u8], mut done: impl FnMut(&[u8])) {
        for &b in data {
            match self.escape {
                Escape::Start => {
                    self.escape = match b {
                        b'[' => Escape::Csi,
                        b'O' => Escape::Ss3,
                        _ => Escape::None,
                    };
                    continue;
                }
                Escape::Csi => {
                    if (0x40..=0x7e).contains(&b) {
                        self.escape = Escape::None;
                    }
                    continue;
                }
                Escape::Ss3 => {
                    self.escape = Escape::None;
                    continue;
                }
                Escape::None => {}
            }
            match b {
                b'\r' | b'\n' => {
                    if !self.line.is_empty() {
                        done(&self.line);
                    }
                    self.line.clear();
                    self.overflowed = false;
                }
                0x7f | 0x08 => {
                    // Drop a whole UTF-8 character.
                    while let Some(c) = self.line.pop() {
                        if c & 0xc0 != 0x80 {
                            break;
                        }
                    }
                }
                0x03 | 0x15 => self.line.clear(),
                0x17 => {
                    while self.line.last() == Some(&b' ') {
                        self.line.pop();
                    }
                    while self.line.last().is_some_and(|c| *c != b' ') {
                        self.line.pop();
                    }
                }
                0x1b => self.escape = Escape::Start,
                b if b < 0x20 => {}
                _ => {
                    if self.line.len() < MAX_LINE {
                        self.line.push(b);
                    } else {
                        self.overflowed = true;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[&[u8]]) -> Vec<String> {
        let mut a = LineAssembler::default();
        let mut out = Vec::new();
        for chunk in input {
            a.push(chunk, |l| out.push(String::from_utf8_lossy(l).into_owned()));
        }
        out
    }

    #[test]
    fn simple_typing_across_chunks() {
        assert_eq!(
            lines(&[b"ls /", b"\r", b"echo h\xc3", b"\xa9llo\r"]),
            ["ls /", "echo héllo"]
        );
    }

    #[test]
    fn editing_keys() {
        assert_eq!(lines(&[b"lsx\x7f -l\r"]), ["ls -l"]);
        assert_eq!(lines(&[b"rm -rf /\x15echo safe\r"]), ["echo safe"]);
        assert_eq!(lines(&[b"sleep 100\x03exit 3\r"]), ["exit 3"]);
        assert_eq!(lines(&[b"cat foo bar\x17baz\r"]), ["cat foo baz"]);
        assert_eq!(lines(&[b"e\xc3\xa9\x7f\r"]), ["e"]);
    }

    #[test]
    fn escape_sequences_are_skipped() {
        assert_eq!(
            lines(&[b"\x1b[Aecho \x1b[200~pasted\x1b[201~\x1bOD\r"]),
            ["echo pasted"]
        );
    }

    #[test]
    fn empty_lines_are_not_reported_and_long_lines_are_capped() {
        assert!(lines(&[b"\r\r\n"]).is_empty());
        let long = vec![b'a'; MAX_LINE + 50];
        let out = lines(&[&long, b"\r"]);
        assert_eq!(out[0].len(), MAX_LINE);
    }
}
