// @tus/server + @tus/file-store, storing into a given folder: the Node.js peer chunkd is compared to.
//
//     node benchmarks/.peers/node/server.mjs DATA_DIR      (copied there by benchmarks/peers.py)
//
// Listens on 127.0.0.1 and a free port; the first stdout line is
// "@tus/server VERSION listening on http://127.0.0.1:PORT" (tus endpoint: /files/).
// The library's defaults otherwise: FileStore with its JSON config store, in-memory locker.
import { readFileSync } from "node:fs";
import { Server } from "@tus/server";
import { FileStore } from "@tus/file-store";

const dir = process.argv[2];
const pkg = JSON.parse(readFileSync(new URL("./node_modules/@tus/server/package.json", import.meta.url)));
const tus = new Server({ path: "/files", datastore: new FileStore({ directory: dir }) });
const http = tus.listen({ host: "127.0.0.1", port: 0 }, () => {
  console.log(`@tus/server ${pkg.version} listening on http://127.0.0.1:${http.address().port}`);
});
for (const sig of ["SIGTERM", "SIGINT"]) {
  process.on(sig, () => {
    http.close();
    http.closeAllConnections?.();
    process.exit(0);
  });
}
