// Builds dist/tether.js (one dependency-free ES module: what `tether serve` serves at /tether.js
// and the npm package's main entry), dist/react.js (the React bindings, importing "react" and
// "./tether.js"), and the .d.ts types (tsc).
import { build } from "esbuild";
import { execFileSync } from "node:child_process";
import { rmSync } from "node:fs";

rmSync("dist", { recursive: true, force: true });

const common = {
  bundle: true,
  format: "esm",
  target: "es2020",
  platform: "browser",
  sourcemap: true,
  legalComments: "none",
  logLevel: "warning",
};

await build({ ...common, entryPoints: ["src/index.ts"], outfile: "dist/tether.js" });
// The copy `tether serve` serves at /tether.js, shipped in the Python package (committed, so
// `pip install` needs no Node; `.ci/run` checks it is this build). No source map: it would
// name a file the server does not serve.
await build({
  ...common,
  sourcemap: false,
  entryPoints: ["src/index.ts"],
  outfile: "../server/tether/server/static/tether.js",
});

// The React entry imports the client from "./index.js"; in dist that module is ./tether.js,
// kept external so a page that loads both gets one copy of the client.
const clientAsExternal = {
  name: "client-as-external",
  setup(b) {
    b.onResolve({ filter: /^\.\/index\.js$/ }, () => ({ path: "./tether.js", external: true }));
  },
};
await build({
  ...common,
  entryPoints: ["src/react.ts"],
  outfile: "dist/react.js",
  external: ["react"],
  plugins: [clientAsExternal],
});

execFileSync("npx", ["tsc", "-p", "tsconfig.build.json"], { stdio: "inherit" });
console.log("built dist/tether.js, dist/react.js, their types, and server/tether/server/static/tether.js");
