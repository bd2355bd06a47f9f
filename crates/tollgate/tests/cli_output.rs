//! Issue 13, finding 5, as a user meets it: the CLI's output piped into `head` ends quietly, a
//! request the server refuses as bad input exits 2 as docs/cli.md says, and the database file
//! `tollgate serve` creates is readable by its owner only.

mod serve;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

use serve::Server;

const TOKEN: &str = "tga_cli-output-admin-token";

fn cli(server: &Server) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tollgate"));
    c.env("TOLLGATE_SERVER", &server.base).env("TOLLGATE_ADMIN_TOKEN", TOKEN);
    c
}

#[tokio::test]
async fn output_into_a_closed_pipe_bad_input_and_the_database_file() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tollgate.db");
    let server = Server::start(dir.path(), TOKEN, &[("TOLLGATE_DB", db.to_str().unwrap())]).await;

    // `tollgate prices --json | head -0`: the reader is gone before the first write.
    let mut child =
        cli(&server).args(["prices", "--json"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "a closed pipe ends the command quietly: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    let out = cli(&server).args(["account", "create", "acme", "--tier", "no-such-tier"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "the server's 400 is a usage error: {stderr}");
    assert!(stderr.contains("no-such-tier"), "{stderr}");

    let mode = std::fs::metadata(&db).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the database file is the owner's alone, not {mode:o}");
}
