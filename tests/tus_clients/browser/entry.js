// The tests' bundle (built by tests/test_tus_browser.py with esbuild, never committed):
// the real tus-js-client and Uppy from ../node_modules, as window.TusTest.
import * as tus from "tus-js-client";
import Uppy from "@uppy/core";
import Tus from "@uppy/tus";
import * as fork from "./fork.js";

window.TusTest = { tus, Uppy, Tus, fork };
