//! A real browser for the dashboard test: Debian's chromium, headless, driven by
//! chromedriver over the W3C WebDriver protocol (plain JSON over HTTP, through reqwest).
//! `PULSES_TEST_CHROMEDRIVER` and `PULSES_TEST_CHROMIUM` override where they are
//! (default: `chromedriver` on PATH, `/usr/bin/chromium`); `scripts/lib.sh` installs both.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};

use super::*;

/// The W3C key of an element reference in WebDriver answers.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

pub struct Browser {
    driver: Child,
    base: String,
    http: reqwest::blocking::Client,
}

impl Browser {
    /// Starts chromedriver on a free port and a headless chromium session.
    pub fn start() -> Browser {
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
        let chromedriver = std::env::var("PULSES_TEST_CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
        let chromium = std::env::var("PULSES_TEST_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        let driver = Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {chromedriver} (apt-get install chromium chromium-driver): {e}"));
        let http = reqwest::blocking::Client::builder().timeout(Duration::from_secs(60)).build().expect("client");
        let root = format!("http://127.0.0.1:{port}");
        wait_for("chromedriver to answer", DEADLINE, || {
            http.get(format!("{root}/status")).send().ok()?.json::<Value>().ok()?["value"]["ready"].as_bool().filter(|r| *r)
        });
        let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1100"]
        }}}});
        let session: Value = http.post(format!("{root}/session")).json(&caps).send().expect("new session").json().expect("session JSON");
        let id = session["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no browser session: {session}")).to_owned();
        Browser { driver, base: format!("{root}/session/{id}"), http }
    }

    fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let answer: Value = req.send().expect("webdriver request").json().expect("webdriver JSON");
        if answer["value"].get("error").is_some() {
            panic!("webdriver {path}: {answer}");
        }
        answer["value"].clone()
    }

    pub fn goto(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", Some(json!({"url": url})));
    }

    /// Runs `script` (a function body; `arguments` are none) in the page; its result.
    pub fn eval(&self, script: &str) -> Value {
        self.call(reqwest::Method::POST, "/execute/sync", Some(json!({"script": script, "args": []})))
    }

    fn find(&self, css: &str) -> String {
        let el = self.call(reqwest::Method::POST, "/element", Some(json!({"using": "css selector", "value": css})));
        el[ELEMENT].as_str().unwrap_or_else(|| panic!("no element {css}: {el}")).to_owned()
    }

    pub fn type_into(&self, css: &str, text: &str) {
        let el = self.find(css);
        self.call(reqwest::Method::POST, &format!("/element/{el}/value"), Some(json!({"text": text})));
    }

    pub fn click(&self, css: &str) {
        let el = self.find(css);
        self.call(reqwest::Method::POST, &format!("/element/{el}/click"), Some(json!({})));
    }

    /// A PNG of the viewport.
    pub fn screenshot(&self) -> Vec<u8> {
        let b64 = self.call(reqwest::Method::GET, "/screenshot", None);
        base64::engine::general_purpose::STANDARD.decode(b64.as_str().expect("base64")).expect("PNG")
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.http.delete(&self.base).send();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
