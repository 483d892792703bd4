#!/usr/bin/env node
// A tq handler in Node: tq worker --exec wordcount=./wordcount.js
//
// Payload on stdin: {"text": "...", "top": 3}; result on stdout:
// {"words": 7, "top": [["the", 3], ...]}. Exit 0: done; 75: retry later; other: failed.
"use strict";

let input = "";
process.stdin.setEncoding("utf8");
process.stdin.on("data", (chunk) => {
  input += chunk;
});
process.stdin.on("end", () => {
  const payload = JSON.parse(input);
  if (typeof payload?.text !== "string") {
    process.stderr.write(`the payload needs a "text" string, got ${input}`);
    process.exit(65); // EX_DATAERR: bad input, not retried
  }
  const counts = new Map();
  for (const word of payload.text.toLowerCase().match(/[\p{L}\p{N}']+/gu) ?? []) {
    counts.set(word, (counts.get(word) ?? 0) + 1);
  }
  const top = [...counts]
    .sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0]))
    .slice(0, payload.top ?? 3);
  let words = 0;
  for (const n of counts.values()) words += n;
  process.stdout.write(JSON.stringify({ words, top }) + "\n");
});
