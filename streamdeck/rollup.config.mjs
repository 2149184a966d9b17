// One file with every dependency inside (the packed plugin runs without npm), as Elgato's
// template builds it, in plain JavaScript.
import commonjs from "@rollup/plugin-commonjs";
import nodeResolve from "@rollup/plugin-node-resolve";

const sdPlugin = "org.webvirt.streamdeck.sdPlugin";

export default {
  input: "src/plugin.js",
  output: { file: `${sdPlugin}/bin/plugin.js`, format: "es" },
  plugins: [
    nodeResolve({ browser: false, exportConditions: ["node"], preferBuiltins: true }),
    commonjs(),
    {
      // The .sdPlugin folder has no package.json: this one makes Node load the bundle as ESM.
      name: "emit-module-package-file",
      generateBundle() {
        this.emitFile({ fileName: "package.json", source: '{ "type": "module" }', type: "asset" });
      },
    },
  ],
};
