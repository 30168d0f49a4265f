// Node-RED settings for the bench (bench/run.py, relay "nodered"; bench/nodered.py).
// A deployed flow as on a gateway: no editor, no admin API, warnings only.
// The runner passes the ports and paths in the environment.
module.exports = {
    uiHost: process.env.RELAY_HOST || "127.0.0.1",
    uiPort: parseInt(process.env.RELAY_WS_PORT, 10),
    userDir: process.env.RELAY_USER_DIR,
    flowFile: process.env.RELAY_FLOW_FILE,
    credentialSecret: false,
    httpAdminRoot: false,
    httpNodeRoot: "/",
    logging: { console: { level: "warn", metrics: false, audit: false } },
    diagnostics: { enabled: false, ui: false },
    telemetry: { enabled: false },
    editorTheme: { projects: { enabled: false } },
    contextStorage: { default: { module: "memory" } },
    exportGlobalContextKeys: false,
    externalModules: { autoInstall: false, palette: { allowInstall: false }, modules: { allowInstall: false } },
};
