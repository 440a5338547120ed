// tests/test_node_client.py runs this: it prints each state as one JSON line until stdin closes.
import { followLicense } from "./license-stream.mjs";

const { BROKER_URL, LICENSE_ID, TOKEN } = process.env;
const stop = followLicense({
  baseUrl: BROKER_URL,
  licenseId: LICENSE_ID,
  getToken: async () => TOKEN,
  onState: (state) => console.log(JSON.stringify({ state })),
  onStatus: (status) => console.log(JSON.stringify({ status })),
});
process.stdin.resume();
process.stdin.on("end", () => {
  stop();
  process.exit(0);
});
