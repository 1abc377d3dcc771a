// Validate FHIR R4 resources with the npm `fhir` package (FHIR.js), a second
// validator next to fhir.resources: it checks cardinalities, data types and
// required value-set bindings (e.g. Observation.status, Provenance.entity.role).
//
// Input on stdin: a JSON array of resources. Output on stdout: a JSON array,
// one {valid, messages} per resource, where messages are the errors and
// warnings FHIR.js reports ({location, resourceId, severity, message}).
'use strict';
const { Fhir } = require('fhir');

function main() {
  const chunks = [];
  process.stdin.on('data', (chunk) => chunks.push(chunk));
  process.stdin.on('end', () => {
    const resources = JSON.parse(Buffer.concat(chunks).toString('utf8'));
    const fhir = new Fhir();
    const results = resources.map((resource) => {
      const result = fhir.validate(resource, { errorOnUnexpected: true });
      return { valid: result.valid, messages: result.messages || [] };
    });
    process.stdout.write(JSON.stringify(results));
  });
}

main();
