//! SFTP (draft-ietf-secsh-filexfer-02, what OpenSSH speaks) requests from the client's byte stream, for the audit
//! trail: file opens (with their access mode), removes, renames, directory changes, attribute changes and links.
//! Reads, writes and listings are not logged one by one (the recording holds the bytes).
//!
//! Pure: bytes in, [`SftpOp`]s out. Packets may span any number of channel messages. A packet larger than
//! [`MAX_PACKET`] (or any malformed input) turns the parser off for the rest of the channel rather than buffer
//! without bound; the relay is never affected.
#![deny(unsafe_code)]

/// OpenSSH's sftp-server limit.
pub const MAX_PACKET: usize = 256 * 1024;

const SSH_FXP_INIT: u8 = 1;
const SSH_FXP_OPEN: u8 = 3;
const SSH_FXP_SETSTAT: u8 = 9;
const SSH_FXP_OPENDIR: u8 = 11;
const SSH_FXP_REMOVE: u8 = 13;
const SSH_FXP_MKDIR: u8 = 14;
const SSH_FXP_RMDIR: u8 = 15;
const SSH_FXP_RENAME: u8 = 18;
const SSH_FXP_SYMLINK: u8 = 20;
const SSH_FXP_EXTENDED: u8 = 200;

const SSH_FXF_READ: u32 = 0x01;
const SSH_FXF_WRITE: u32 = 0x02;
const SSH_FXF_APPEND: u32 = 0x04;
const SSH_FXF_CREAT: u32 = 0x08;
const SSH_FXF_TRUNC: u32 = 0x10;

/// One logged operation, rendered as a line like `open /etc/hosts (read)` by [`SftpOp::describe`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SftpOp {
    Open {
        path: Vec<u8>,
        flags: u32,
    },
    OpenDir {
        path: Vec<u8>,
    },
    Remove {
        path: Vec<u8>,
    },
    Mkdir {
        path: Vec<u8>,
    },
    Rmdir {
        path: Vec<u8>,
    },
    Rename {
        from: Vec<u8>,
        to: Vec<u8>,
    },
    Setstat {
        path: Vec<u8>,
    },
    Symlink {
        a: Vec<u8>,
        b: Vec<u8>,
    },
    /// `posix-rename@openssh.com`, `hardlink@openssh.com`, …
    Extended {
        name: String,
        a: Vec<u8>,
        b: Vec<u8>,
    },
}

impl SftpOp {
    pub fn describe(&self) -> String {
        let s = |p: &[u8]| String::from_utf8_lossy(p).into_owned();
        match self {
            SftpOp::Open { path, flags } => {
                let mut mode = Vec::new();
                if flags & SSH_FXF_READ != 0 {
                    mode.push("read");
                }
                if flags & SSH_FXF_WRITE != 0 {
                    mode.push("write");
                }
                if flags & SSH_FXF_APPEND != 0 {
                    mode.push("append");
                }
                if flags & SSH_FXF_CREAT != 0 {
                    mode.push("create");
                }
                if flags & SSH_FXF_TRUNC != 0 {
                    mode.push("truncate");
                }
                format!("open {} ({})", s(path), mode.join(","))
            }
            SftpOp::OpenDir { path } => format!("opendir {}", s(path)),
            SftpOp::Remove { path } => format!("remove {}", s(path)),
            SftpOp::Mkdir { path } => format!("mkdir {}", s(path)),
            SftpOp::Rmdir { path } => format!("rmdir {}", s(path)),
            SftpOp::Rename { from, to } => format!("rename {} {}", s(from), s(to)),
            SftpOp::Setstat { path } => format!("setstat {}", s(path)),
            SftpOp::Symlink { a, b } => format!("symlink {} {}", s(a), s(b)),
            SftpOp::Extended { name, a, b } => match name.as_str() {
                "posix-rename@openssh.com" => format!("rename {} {}", s(a), s(b)),
                "hardlink@openssh.com" => format!("link {} {}", s(a), s(b)),
                _ => format!("{name} {} {}", s(a), s(b)),
            },
        }
    }
}

#[derive(Debug, Default)]
pub struct SftpParser {
    buf: Vec<u8>,
    disabled: bool,
}

impl SftpParser {
    /// Feeds client-to-server bytes; returns the operations completed by them.
    pub fn push(&mut self, data: &[u8]) -> Vec<SftpOp> {
        let mut ops = Vec::new();
        if self.disabled {
            return ops;
        }
        self.buf.extend_from_slice(data);
        let mut at = 0;
        while self.buf.len() - at >= 4 {
            let len = u32::from_be_bytes([
                self.buf[at],
                self.buf[at + 1],
                self.buf[at + 2],
                self.buf[at + 3],
            ]) as usize;
            if len == 0 || len > MAX_PACKET {
                self.disabled = true;
                self.buf = Vec::new();
                return ops;
            }
            if self.buf.len() - at < 4 + len {
                break;
            }
            let packet = &self.buf[at + 4..at + 4 + len];
            if let Some(op) = parse(packet) {
                ops.push(op);
            }
            at += 4 + len;
        }
        self.buf.drain(..at);
        ops
    }
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn u32(&mut self) -> Option<u32> {
        if self.0.len() < 4 {
            return None;
        }
        let (h, rest) = self.0.split_at(4);
        self.0 = rest;
        Some(u32::from_be_bytes([h[0], h[1], h[2], h[3]]))
    }
    fn string(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        if self.0.len() < n {
            return None;
        }
        let (s, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(s)
    }
}

fn parse(packet: &[u8]) -> Option<SftpOp> {
    let mut c = Cursor(packet);
    let kind = c.u8()?;
    if kind == SSH_FXP_INIT {
        return None;
    }
    let _request_id = c.u32()?;
    let path = |c: &mut Cursor<'_>| c.string().map(<[u8]>::to_vec);
    Some(match kind {
        SSH_FXP_OPEN => {
            let p = path(&mut c)?;
            SftpOp::Open {
                path: p,
                flags: c.u32()?,
            }
        }
        SSH_FXP_OPENDIR => SftpOp::OpenDir {
            path: path(&mut c)?,
        },
        SSH_FXP_REMOVE => SftpOp::Remove {
            path: path(&mut c)?,
        },
        SSH_FXP_MKDIR => SftpOp::Mkdir {
            path: path(&mut c)?,
        },
        SSH_FXP_RMDIR => SftpOp::Rmdir {
            path: path(&mut c)?,
        },
        SSH_FXP_RENAME => SftpOp::Rename {
            from: path(&mut c)?,
            to: path(&mut c)?,
        },
        SSH_FXP_SETSTAT => SftpOp::Setstat {
            path: path(&mut c)?,
        },
        SSH_FXP_SYMLINK => SftpOp::Symlink {
            a: path(&mut c)?,
            b: path(&mut c)?,
        },
        SSH_FXP_EXTENDED => {
            let name = String::from_utf8_lossy(c.string()?).into_owned();
            if !matches!(
                name.as_str(),
                "posix-rename@openssh.com" | "hardlink@openssh.com"
            ) {
                return None;
            }
            SftpOp::Extended {
                name,
                a: path(&mut c)?,
                b: path(&mut c)?,
            }
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(kind: u8, id: u32, fields: &[&[u8]], tail: &[u8]) -> Vec<u8> {
        let mut body = vec![kind];
        body.extend_from_slice(&id.to_be_bytes());
        for f in fields {
            body.extend_from_slice(&(f.len() as u32).to_be_bytes());
            body.extend_from_slice(f);
        }
        body.extend_from_slice(tail);
        let mut p = (body.len() as u32).to_be_bytes().to_vec();
        p.extend_from_slice(&body);
        p
    }

    #[test]
    fn operations_split_across_messages() {
        let mut init = vec![0, 0, 0, 5, SSH_FXP_INIT, 0, 0, 0, 3];
        init.extend(packet(
            SSH_FXP_OPEN,
            1,
            &[b"/tmp/up.bin"],
            &[0, 0, 0, 0x1a, 0, 0, 0, 0],
        ));
        init.extend(packet(SSH_FXP_RENAME, 2, &[b"/a", b"/b"], &[]));
        init.extend(packet(SSH_FXP_REMOVE, 3, &[b"/tmp/x"], &[]));
        let mut p = SftpParser::default();
        let mut ops = Vec::new();
        for chunk in init.chunks(3) {
            ops.extend(p.push(chunk));
        }
        let described: Vec<String> = ops.iter().map(SftpOp::describe).collect();
        assert_eq!(
            described,
            [
                "open /tmp/up.bin (write,create,truncate)",
                "rename /a /b",
                "remove /tmp/x"
            ]
        );
    }

    #[test]
    fn reads_and_writes_are_not_logged_and_garbage_disables() {
        let mut p = SftpParser::default();
        assert!(p.push(&packet(5, 9, &[b"handle"], &[0; 12])).is_empty());
        assert!(p.push(&[0xff, 0xff, 0xff, 0xff, 1]).is_empty());
        assert!(p
            .push(&packet(SSH_FXP_REMOVE, 3, &[b"/tmp/x"], &[]))
            .is_empty());
    }
}
