//! A real PostgreSQL (Debian's `postgresql` package) per test: its own cluster in a temp dir, initialised
//! and run as user `postgres` (PostgreSQL refuses root) through `runuser`, on a private port and socket
//! directory, `fsync=off` (a test cluster; nothing to survive a power loss). Password authentication
//! (scram-sha-256) everywhere, so a wrong password is refused as in production. Dropping the guard stops
//! the server (`pg_ctl stop`, which signals the postmaster this guard started), also on panic.
//!
//! Gateways in network namespaces reach it through its Unix socket (a path, shared across namespaces);
//! the test itself may use either.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::process::{run, Ran};
use super::tmp::{tempdir, TempDir};

/// The password of the `postgres` role in every test cluster.
pub const PASSWORD: &str = "rampart-test-pg";

pub struct Postgres {
    dir: TempDir,
    bin: PathBuf,
    pub port: u16,
    running: bool,
    /// Server TLS on (`enable_tls`): TCP connections must use it.
    tls: bool,
}

/// The newest `/usr/lib/postgresql/<v>/bin` with an `initdb`.
fn pg_bin() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, b)| b).unwrap_or_else(|| {
        panic!("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb); `make deps` installs the apt package postgresql")
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn as_postgres(bin: &Path, tool: &str) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--"]).arg(bin.join(tool));
    c
}

fn chown_postgres(p: &Path) {
    let r = run(
        Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(p),
        Duration::from_secs(30),
    );
    assert!(r.success(), "{r}");
}

impl Postgres {
    /// Initialises a cluster and starts it (about a second); panics with PostgreSQL's log if it cannot.
    pub fn start(tag: &str) -> Postgres {
        let bin = pg_bin();
        let dir = tempdir(&format!("pg-{tag}"));
        // The temp dir's parents must let user postgres through (they are root's).
        let top = dir.path().to_path_buf();
        std::fs::create_dir_all(top.join("sock")).unwrap();
        std::fs::write(top.join("pwfile"), PASSWORD).unwrap();
        std::fs::write(top.join("password"), PASSWORD).unwrap();
        chown_postgres(&top);
        let r = run(
            as_postgres(&bin, "initdb")
                .arg("-D")
                .arg(top.join("data"))
                .args(["-U", "postgres", "-A", "scram-sha-256", "--no-sync"])
                .arg(format!("--pwfile={}", top.join("pwfile").display())),
            Duration::from_secs(120),
        );
        assert!(r.success(), "initdb failed: {r}");
        let mut pg = Postgres {
            dir,
            bin,
            port: free_port(),
            running: false,
            tls: false,
        };
        pg.restart();
        pg
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The socket directory (a `host=` for libpq-style connection strings).
    pub fn socket_dir(&self) -> PathBuf {
        self.dir().join("sock")
    }

    /// A file holding the password (for `fleet.postgres_password_file`).
    pub fn password_file(&self) -> PathBuf {
        self.dir().join("password")
    }

    /// A connection string without the password, through the Unix socket.
    pub fn url(&self) -> String {
        format!(
            "host={} port={} user=postgres dbname=postgres connect_timeout=5",
            self.socket_dir().display(),
            self.port
        )
    }

    /// Starts the (stopped) server again, on the same port and data.
    pub fn restart(&mut self) {
        assert!(!self.running, "PostgreSQL is already running");
        let data = self.dir().join("data");
        let mut opts = format!(
            "-k {} -c listen_addresses=127.0.0.1 -p {} -c fsync=off",
            self.socket_dir().display(),
            self.port
        );
        if self.tls {
            opts.push_str(&format!(
                " -c ssl=on -c ssl_cert_file={0}/server.crt -c ssl_key_file={0}/server.key",
                self.dir().join("tls").display()
            ));
        }
        let r = run(
            as_postgres(&self.bin, "pg_ctl")
                .arg("-D")
                .arg(&data)
                .args(["-w", "-t", "60", "-l"])
                .arg(self.dir().join("server.log"))
                .args(["-o", &opts, "start"]),
            Duration::from_secs(90),
        );
        if !r.success() {
            panic!(
                "pg_ctl start failed: {r}\n--- server.log ---\n{}",
                std::fs::read_to_string(self.dir().join("server.log")).unwrap_or_default()
            );
        }
        self.running = true;
    }

    /// Restarts the server with TLS on 127.0.0.1 (a test CA signs a certificate for IP 127.0.0.1) and TCP
    /// allowed with TLS only (`hostssl`); the Unix socket is unchanged. Returns the CA certificate's path.
    pub fn enable_tls(&mut self) -> PathBuf {
        let tls = self.dir().join("tls");
        std::fs::create_dir_all(&tls).unwrap();
        let ssl = |args: &[&str]| {
            let r = run(
                Command::new("openssl").args(args).current_dir(&tls),
                Duration::from_secs(60),
            );
            assert!(r.success(), "openssl: {r}");
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut a = vec!["req", "-x509"];
        a.extend(ec);
        a.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=rampart test CA",
        ]);
        ssl(&a);
        let mut a = vec!["req"];
        a.extend(ec);
        a.extend([
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ]);
        ssl(&a);
        std::fs::write(
            tls.join("ext.cnf"),
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1\n",
        )
        .unwrap();
        ssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ]);
        chown_postgres(&tls);
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(
            tls.join("server.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        std::fs::write(
            self.dir().join("data/pg_hba.conf"),
            "local all all scram-sha-256\nhostssl all all 127.0.0.1/32 scram-sha-256\n",
        )
        .unwrap();
        chown_postgres(&self.dir().join("data/pg_hba.conf"));
        if self.running {
            let r = self.stop("fast");
            assert!(r.success(), "{r}");
        }
        self.tls = true;
        self.restart();
        tls.join("ca.pem")
    }

    /// A connection string over TCP to 127.0.0.1 with `sslmode`.
    pub fn tcp_url(&self, sslmode: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode={sslmode} connect_timeout=5",
            self.port
        )
    }

    /// `pg_ctl stop -m <mode>` (`fast`, or `immediate`: a crash, no shutdown checkpoint).
    pub fn stop(&mut self, mode: &str) -> Ran {
        let r = run(
            as_postgres(&self.bin, "pg_ctl")
                .arg("-D")
                .arg(self.dir().join("data"))
                .args(["-w", "-t", "60", "-m", mode, "stop"]),
            Duration::from_secs(90),
        );
        if r.success() {
            self.running = false;
        }
        r
    }

    /// Runs SQL with `psql` (as user postgres, through the socket) and returns its unaligned output.
    pub fn psql(&self, sql: &str) -> String {
        let r = run(
            as_postgres(&self.bin, "psql")
                .env("PGPASSWORD", PASSWORD)
                .arg("-h")
                .arg(self.socket_dir())
                .args([
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "postgres",
                    "-d",
                    "postgres",
                ])
                .args(["-v", "ON_ERROR_STOP=1", "-At", "-c", sql]),
            Duration::from_secs(60),
        );
        assert!(r.success(), "psql failed: {r}");
        r.stdout
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.running && !self.stop("fast").success() {
            let _ = self.stop("immediate");
        }
    }
}
