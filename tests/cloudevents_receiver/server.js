// A CloudEvents sink for tests/integration/test_events.py: parses every request with the npm cloudevents
// SDK and appends what it parsed, as one JSON line, to the file given as the second argument.
// Paths choose the answer: /ok -> 202, /reject -> 400, /flaky -> 503 twice, then 202.
// Usage: node server.js PORT EVENTS_FILE   (listens on 127.0.0.1 only)
"use strict";
const http = require("http");
const fs = require("fs");
const { HTTP } = require("cloudevents");

const [port, eventsFile] = process.argv.slice(2);
const seen = {};

const server = http.createServer((req, res) => {
  const chunks = [];
  req.on("data", (chunk) => chunks.push(chunk));
  req.on("end", () => {
    const path = req.url.split("?")[0];
    seen[path] = (seen[path] || 0) + 1;
    let record;
    try {
      const event = HTTP.toEvent({ headers: req.headers, body: Buffer.concat(chunks).toString("utf8") });
      event.validate();
      record = { path, parsed: true, event: event.toJSON() };
    } catch (err) {
      record = { path, parsed: false, error: String(err) };
    }
    fs.appendFileSync(eventsFile, JSON.stringify(record) + "\n");
    let status = 202;
    if (!record.parsed || path === "/reject") status = 400;
    else if (path === "/flaky" && seen[path] <= 2) status = 503;
    res.writeHead(status, { "Content-Type": "text/plain" });
    res.end(status < 300 ? "ok" : "not now");
  });
});
server.listen(Number(port), "127.0.0.1", () => {
  process.stdout.write("listening\n");
});
for (const signal of ["SIGTERM", "SIGINT"]) process.on(signal, () => server.close(() => process.exit(0)));
